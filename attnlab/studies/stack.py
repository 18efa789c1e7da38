"""A group's cells stacked on a leading axis: the arrays, where they live, mapping over them.

`Stack` is every per-cell array of a group (train state, best parameters and
their scores, updates applied, alive) as one pytree, which is what a group
checkpoint holds. `place` splits a stack computed side by side over the
devices (`cell_mesh`), several processes included; `over_cells` maps
a one-cell function over the cell axis (vmapped, in chunks, or one at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from attnlab import model_fns
from attnlab.studies import groups as groups_lib


@flax.struct.dataclass
class Stack:
  """The group's per-cell arrays along a leading cell axis (one pytree: it is checkpointed)."""

  state: model_fns.TrainState
  best_params: Any
  best_error: jax.Array  # [C] float32: validation error of best_params (inf: none yet)
  best_loss: jax.Array  # [C] float32
  best_step: jax.Array  # [C] int32
  applied: jax.Array  # [C] int32: updates applied (stops growing when a cell diverges)
  alive: jax.Array  # [C] bool: False once an update was non-finite (the cell is frozen)
  last_loss: jax.Array  # [C] float32: training loss of the last applied update
  # [C] float32: the largest training loss of the updates applied since the cell's last
  # selection point (-inf: none yet; NaN: unknown, after resuming a checkpoint that lacked it).
  # A learning curve that samples one batch per point would miss a spike between points.
  interval_loss_max: jax.Array

  def tree(self) -> dict[str, Any]:
    # Not dataclasses.asdict: it would turn the TrainState into a dict too.
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def take(self, positions: Sequence[int]) -> Stack:
    index = np.asarray(positions)
    return Stack(**jax.tree.map(lambda x: x[index], self.tree()))


def cell_mesh(num_cells: int, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh ("cells", "copies") a stack of `num_cells` side by side is split over.

  The cell axis is split `c` ways, c the largest divisor of `num_cells` that
  the devices allow, so every device holds as many cells: 18 cells on 8
  devices of one process use 6, and as cells finish the stack moves onto a
  split that divides what is left. Every process of `devices` (default:
  all) takes part with as many devices, in process order, so that each holds
  a share of every group it runs the programs of: the split uses
  lcm(c, processes) devices, and where that is more than c the cells are
  repeated along "copies" (1 cell on 2 processes: a copy on each). One
  process: "copies" is 1.
  A group whose cells are a multiple of the device count keeps every device busy.
  """
  devices = list(jax.devices() if devices is None else devices)
  by_process: dict[int, list[jax.Device]] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  processes, per_process = len(by_process), min(len(ds) for ds in by_process.values())
  cells = max(c for c in range(1, num_cells + 1)
              if num_cells % c == 0 and math.lcm(c, processes) <= processes * per_process)
  used = math.lcm(cells, processes) // processes  # devices of each process
  grid = [d for _, ds in sorted(by_process.items()) for d in ds[:used]]
  return jax.sharding.Mesh(np.asarray(grid).reshape(cells, -1), ("cells", "copies"))


def stack_sharding(num_cells: int, setup: groups_lib.GroupSetup) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(cell_mesh(num_cells, setup.devices),
                                    jax.sharding.PartitionSpec("cells"))


def place(stack: Stack, setup: groups_lib.GroupSetup) -> tuple[Stack, groups_lib.GroupSetup]:
  """A stack side by side split over `cell_mesh`, with `setup`'s data replicated on it.

  Cells one at a time or in chunks (`lax.map` steps through the cell axis)
  stay where they are.
  """
  if not groups_lib.side_by_side(setup.vmap_cells, len(stack.applied)):
    return stack, setup
  sharding = stack_sharding(len(stack.applied), setup)
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  splits = {f.name: getattr(setup.data, f.name) for f in dataclasses.fields(groups_lib.StudyData)}
  data = groups_lib.StudyData(**put(splits, replicated))
  return put(stack, sharding), dataclasses.replace(setup, data=data)


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`tree`'s arrays on `sharding`, which may span several processes.

  jax.device_put moves arrays within one process; across processes each one
  builds its own shards from the whole value (`host_value`, the same on
  every process) with `jax.make_array_from_callback`.
  """
  def put_one(x):
    if x.sharding == sharding:
      return x
    if sharding.is_fully_addressable and x.is_fully_addressable:
      return jax.device_put(x, sharding)
    value = host_value(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put_one, tree)


def host_value(x: jax.Array) -> np.ndarray:
  """The whole of `x` in this process's memory.

  An array split across processes is gathered from all of them: a collective
  that every process calls at the same point (they run the same code).
  """
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_cell(stack: Stack) -> dict[str, np.ndarray]:
  """The stack's per-cell scalars ([C] each) in this process's memory, for the results."""
  return {name: host_value(getattr(stack, name))
          for name in ("best_error", "best_loss", "best_step", "applied", "last_loss")}


def init_stack(spec: groups_lib.GroupSpec, setup: groups_lib.GroupSetup) -> Stack:
  # One compiled init called per seed, then stacked: vmapping init compiles
  # the model's construction under vmap, measured 5.2 s against 2.9 s for
  # the quick digits model (more than the vmapped train step's 5 s).
  init = _jit_init(setup.fns)
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *[init(c.seed) for c in spec.cells])
  num = len(spec.cells)
  # A copy: the stack is donated to each step, and one buffer must not be donated twice.
  return Stack(state=state, best_params=copy_tree(state.params),
                best_error=jnp.full((num,), jnp.inf, jnp.float32),
                best_loss=jnp.full((num,), jnp.inf, jnp.float32),
                best_step=jnp.zeros((num,), jnp.int32), applied=jnp.zeros((num,), jnp.int32),
                alive=jnp.ones((num,), bool), last_loss=jnp.full((num,), jnp.nan, jnp.float32),
                interval_loss_max=jnp.full((num,), -jnp.inf, jnp.float32))


@functools.lru_cache(maxsize=8)
def _jit_init(fns: model_fns.ModelFns):
  return jax.jit(fns.init)


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def over_cells(fn, in_axes, vmap_cells: int | None):
  """`fn` mapped over the stacked cell axis: vmapped, vmapped in chunks, or one cell at a time.

  One at a time (`vmap_cells=1`) is a plain `lax.map`, not chunks of one
  (which would vmap each cell's program over an axis of one); chunks as large
  as the stack are one vmap, as None (and split like it: `place`).
  """
  if vmap_cells is None:
    return jax.vmap(fn, in_axes=in_axes)

  def chunked(*args):
    mapped = [a for a, axis in zip(args, in_axes) if axis == 0]
    if groups_lib.side_by_side(vmap_cells, jax.tree.leaves(mapped)[0].shape[0]):
      return jax.vmap(fn, in_axes=in_axes)(*args)
    shared = [a for a, axis in zip(args, in_axes) if axis is None]

    def one(xs):
      it_x, it_s = iter(xs), iter(shared)
      return fn(*[next(it_x) if axis == 0 else next(it_s) for axis in in_axes])

    return jax.lax.map(one, mapped, batch_size=None if vmap_cells == 1 else vmap_cells)

  return chunked
