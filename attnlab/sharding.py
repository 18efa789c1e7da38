"""Where a run's arrays live on many devices: the mesh, the logical-axis rules, the shardings.

Every parameter names its axes ("embed", "heads", "mlp", ...; `attnlab.models.params`).
A run names its device mesh (`config.mesh`: axis name -> size) and how logical
axes map onto mesh axes (`config.sharding_rules`: overrides of `DEFAULT_RULES`).
The names and the default rules are stated in `attnlab.axes` (re-exported here).
The rules are one set; the mesh's shape picks the strategy (the presets):

  config.mesh                          strategy
  {"data": -1}  (the default)          data parallel: state replicated, batch split
  {"fsdp": -1}                         FSDP: parameters and optimizer state split along
                                       "embed", batch split, weights gathered per layer
  {"data": -1, "model": 2}             tensor parallel over 2 devices (Megatron): heads,
                                       MLP and vocabulary split, batch split over the rest
  {"data": 2, "fsdp": 4}               hybrid: FSDP within groups of 4, data parallel
                                       across the 2 groups (8 devices)
  {"data": 2, "fsdp": 2, "model": 2}   all three at once (8 devices)

-1 is "the rest of the devices"; an axis left out (or None) has size 1, except
"data", which takes the rest unless another axis does. Every training config has
both sections with every field (`config_sections`, which the configs' helper
`experiment.new_config` adds), so `--config.mesh.fsdp=-1` works on any of them;
neither changes what is trained (`configlib.RUN_NEUTRAL_SECTIONS`).

Several processes (`jax.distributed`): the mesh spans every process's devices;
each process reads only the rows of a global batch its devices hold
(`process_rows`) and `put_batch` assembles the global array from them. The batch is split over the
data axes ("data" and "fsdp"); every array of the train state without logical
names (step, key, optimizer counts) is replicated.

The mesh's axes are `Auto` (XLA's partitioner places the activations): the
model code annotates no activation, and explicit-sharding mode would require
an out_sharding on every contraction over a split axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from attnlab import checks
from attnlab import configlib
# Stated in the bottom layer, where the models and the kernels read them too; re-exported
# (HEAD_AXES among them) so that `sharding.MESH_AXES` and the others keep working.
from attnlab.axes import DATA_AXES, DEFAULT_RULES, HEAD_AXES, MESH_AXES, variable_axes

P = jax.sharding.PartitionSpec

MeshShape = tuple[tuple[str, int], ...]  # ((axis, size), ...) in MESH_AXES order; -1 = the rest
Rules = tuple[tuple[str, tuple[str, ...]], ...]  # ((logical name, mesh axes), ...)


# ----------------------------------------------------------------------------
# Config fields -> a mesh shape and rules (checked, hashable).
# ----------------------------------------------------------------------------


def mesh_shape(mesh: Mapping[str, int] | Sequence[tuple[str, int]] | None, *,
               field: str = "config.mesh") -> MeshShape:
  """`config.mesh` checked and completed: every axis of MESH_AXES with its size.

  Args:
    mesh: axis name -> size (-1: the rest of the devices, at most one axis;
      None: left out); None or {}: data parallel over every device.
    field: the config field, for messages.

  Raises:
    configlib.ConfigError: an unknown axis (with "did you mean"), a size that
      is neither a positive int nor -1, or two axes of size -1.
  """
  given = {axis: size for axis, size in dict(mesh or {}).items() if size is not None}
  configlib.check_known(given, MESH_AXES, where=field)
  for axis, size in given.items():
    if not checks.is_int(size) or not (size >= 1 or size == -1):
      raise configlib.ConfigError(f"{field}.{axis}={size!r}: expected a positive int, or -1 "
                                  "for the rest of the devices.")
  rest = [axis for axis, size in given.items() if size == -1]
  if len(rest) > 1:
    raise configlib.ConfigError(f"{field}={given}: only one axis may be -1 (the rest of the "
                                f"devices); got {rest}.")
  if "data" not in given:
    given["data"] = 1 if rest else -1
  return tuple((axis, int(given.get(axis, 1))) for axis in MESH_AXES)


def sharding_rules(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None, *,
                   field: str = "config.sharding_rules") -> Rules:
  """`DEFAULT_RULES` with `config.sharding_rules` applied, each value a tuple of mesh axes.

  Args:
    overrides: logical name -> a mesh axis, a list of mesh axes (split over
      their product), or None (replicated); None or {}: the defaults.
    field: the config field, for messages.

  Raises:
    configlib.ConfigError: an unknown logical name or mesh axis (with "did you mean").
  """
  merged = {name: _as_tuple(axes) for name, axes in DEFAULT_RULES.items()}
  given = dict(overrides or {})
  configlib.check_known(given, DEFAULT_RULES, where=field)
  for name, axes in given.items():
    axes = _as_tuple(axes) if isinstance(axes, (str, Sequence, type(None))) else (axes,)
    for axis in axes:
      if axis not in MESH_AXES:
        raise configlib.ConfigError(
            f"{field}.{name}={given[name]!r}: {axis!r} is not a mesh axis."
            f"{configlib.suggest(str(axis), MESH_AXES)} Mesh axes: {', '.join(MESH_AXES)} "
            "(or None: replicated).")
    merged[name] = axes
  return tuple(merged.items())


def config_sections() -> dict[str, ml_collections.ConfigDict]:
  """A training config's `mesh` and `sharding_rules` sections, every field at its default.

  Every field is listed so that a locked config takes any override
  (`--config.mesh.fsdp=-1`, `--config.sharding_rules.embed=none`). mesh.data
  is None, not -1: it takes the rest of the devices unless an override gives
  another axis -1, which two -1s would refuse. A rule is a mesh axis, a tuple
  of them, or None (replicated).
  """
  mesh = {axis: configlib.nullable(None, int) if axis == "data" else 1 for axis in MESH_AXES}
  rules = {name: configlib.nullable(axes, object) for name, axes in DEFAULT_RULES.items()}
  return {"mesh": ml_collections.ConfigDict(mesh),
          "sharding_rules": ml_collections.ConfigDict(rules)}


def _as_tuple(axes: str | Sequence[str] | None) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def describe(shape: MeshShape) -> str:
  """'data=4 x fsdp=1 x model=2' (sizes as given: -1 for the rest)."""
  return " x ".join(f"{axis}={size}" for axis, size in shape)


def resolve(shape: MeshShape, num_devices: int, *, field: str = "config.mesh") -> dict[str, int]:
  """Axis -> size with -1 replaced by the rest, checked against `num_devices`.

  Raises:
    configlib.ConfigError: the sizes do not multiply to the device count (or,
      with -1, do not divide it), naming the sizes, the count and the fix.
  """
  sizes = dict(shape)
  known = math.prod(size for size in sizes.values() if size != -1)
  rest = [axis for axis, size in sizes.items() if size == -1]
  if rest and num_devices % known == 0:
    sizes[rest[0]] = num_devices // known
  elif rest or known != num_devices:
    what = (f"the other axes multiply to {known}, which does not divide" if rest
            else f"the sizes multiply to {known}, not")
    raise configlib.ConfigError(
        f"{field} ({describe(shape)}): {what} the {num_devices} devices. Give sizes whose "
        f"product is {num_devices}, or set one axis to -1 (the rest of the devices).")
  return sizes


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None, *,
              field: str = "config.mesh") -> jax.sharding.Mesh:
  """The mesh of `shape` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = resolve(shape, len(devices), field=field)
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


# ----------------------------------------------------------------------------
# Shardings of a state's shapes.
# ----------------------------------------------------------------------------


def partition_spec(axes: Sequence[str], shape: Sequence[int], mesh: jax.sharding.Mesh,
                   rules: Rules, *, where: str) -> jax.sharding.PartitionSpec:
  """The PartitionSpec of an array with logical `axes` and `shape` under `rules`.

  A mesh axis already used by an earlier dimension of the same array is not
  used again (that dimension is then split over the others of its rule, or
  replicated); mesh axes of size 1 are left out.

  Raises:
    configlib.ConfigError: a logical name without a rule, or a dimension that
      the mesh axes of its rule do not divide (naming `where`, the sizes and the fix).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape, strict=True):
    if name not in table:
      raise configlib.ConfigError(
          f"{where}: logical axis {name!r} has no sharding rule; add it to "
          "attnlab.axes.DEFAULT_RULES (or config.sharding_rules).")
    mesh_axes = tuple(a for a in table[name] if a not in used and mesh.shape[a] > 1)
    used.update(mesh_axes)
    split = math.prod(mesh.shape[a] for a in mesh_axes)
    if dim % split:
      over = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
      raise configlib.ConfigError(
          f"{where}: axis {name!r} of size {dim} (shape {tuple(shape)}) does not split over "
          f"the mesh axes {over}. Use a mesh whose {'/'.join(mesh_axes)} size divides {dim}, "
          f"or set config.sharding_rules.{name}=None (replicated).")
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """A NamedSharding for every leaf of `abstract_state` (e.g. from `jax.eval_shape`).

  A leaf inside an `nnx.Variable` with logical axis names (the parameters and
  the optimizer's per-parameter moments) is split as `rules` say; any other
  leaf (step, key, counts) is replicated. Same tree structure as `abstract_state`.
  """
  replicated = jax.sharding.NamedSharding(mesh, P())

  def one(path, leaf):
    if not isinstance(leaf, nnx.Variable):
      return replicated
    axes = variable_axes(leaf)
    if axes is None:
      return jax.tree.map(lambda _: replicated, leaf)
    spec = partition_spec(axes, leaf.shape, mesh, rules, where=_path_str(path))
    return jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, spec), leaf)

  return jax.tree_util.tree_map_with_path(one, abstract_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_str(path) -> str:
  """'params/encoder/blocks/0/attn/query/kernel' for a tree path."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def data_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split: the product of the data axes' sizes."""
  return math.prod(mesh.shape[a] for a in DATA_AXES)


def check_batch_size(field: str, batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Refuses a batch that the data axes of `mesh` do not split evenly.

  Raises:
    configlib.ConfigError: naming the field, the sizes and the fix.
  """
  n = data_size(mesh)
  if batch_size % n == 0:
    return
  axes = " x ".join(f"{a}={mesh.shape[a]}" for a in DATA_AXES)
  raise configlib.ConfigError(
      f"{field}={batch_size} does not split over the data axes ({axes} = {n} ways, on "
      f"{mesh.devices.size} devices; the batch is split across them): set {field} to a "
      f"multiple of {n} (e.g. "
      f"{max(n, batch_size // n * n)}), or change config.mesh.")


def process_rows(batch_sharding: jax.sharding.Sharding, batch_size: int) -> slice:
  """The rows of a global batch of `batch_size` that this process's devices hold.

  One process: all of them. Several: the block its devices' shards cover,
  contiguous because `make_mesh` lays the devices out in process order.

  Raises:
    ValueError: the shards of this process are not one block of rows (a mesh
      laid out over devices out of process order); naming the fix.
  """
  spans = {(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
           for index in batch_sharding.addressable_devices_indices_map((batch_size,)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  # Equal shards are identical or disjoint: the distinct ones tile [start, stop) iff contiguous.
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(
        f"Process {jax.process_index()} holds rows {sorted(spans)} of each batch of {batch_size}: "
        "not one block. Build the mesh with sharding.make_mesh over jax.devices() (process order).")
  return slice(start, stop)


def put_batch(batch: Any, batch_sharding: jax.sharding.Sharding, batch_size: int) -> Any:
  """Global arrays of `batch_size` rows from this process's rows of them (`process_rows`).

  Each process passes only what it read; nothing crosses between hosts. In
  one process this is `jax.device_put(batch, batch_sharding)`.
  """
  return jax.tree.map(
      lambda rows: jax.make_array_from_process_local_data(
          batch_sharding, rows, (batch_size, *rows.shape[1:])), batch)


@functools.lru_cache(maxsize=32)
def under_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """`fn` run with `mesh` in context, for the code that reads it when traced.

  The fused attention kernel splits itself over the mesh in context
  (`attnlab.kernels.sharded`); the jnp code needs none. Memoised: the same
  `fn` and mesh give the same function, so jax.jit reuses its compilation.
  """
  @functools.wraps(fn)
  def with_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return with_mesh


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Where the train state and the batches live.

  Attributes:
    mesh: the device mesh (axes MESH_AXES).
    state: a NamedSharding per leaf of the train state (`state_shardings`).
    batch: a batch's leaves, split along their first axis over the data axes.
  """

  mesh: jax.sharding.Mesh
  state: Any
  batch: jax.sharding.NamedSharding

  @classmethod
  def create(cls, abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules, *,
             batch_sizes: Mapping[str, int]) -> Shardings:
    """The shardings of a state on `mesh`, checking that every batch size splits.

    Args:
      abstract_state: the state's shapes (`jax.eval_shape`: nothing allocated).
      mesh: from `make_mesh`.
      rules: from `sharding_rules`.
      batch_sizes: config field -> the batch size it sets, for every batch
        these shardings will place (e.g. {"config.batch_size": 128}).

    Raises:
      configlib.ConfigError: a batch size that does not split, or a parameter
        that its rule cannot split (each message names the sizes and the fix).
    """
    for field, size in batch_sizes.items():
      check_batch_size(field, size, mesh)
    return cls(mesh=mesh, state=state_shardings(abstract_state, mesh, rules),
               batch=jax.sharding.NamedSharding(mesh, P(DATA_AXES)))
