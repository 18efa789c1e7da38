"""The fused kernels inside sharded programs: one kernel call per shard, under `jax.shard_map`.

A Pallas call is a custom call that XLA's partitioner cannot split: under plain
jit on a mesh it would gather q, k and v whole onto every device and compute
all of attention there. Attention is independent per batch row and per head,
so when a mesh is in context (`jax.set_mesh`, or `use_abstract_mesh` as
`attnlab.experiment`'s jitted steps set it) `flash_attention` instead runs the
kernel on each device's shard: the batch split over the mesh's data axes and
the heads over its "model" axis (`attnlab.axes`), with no collective.

An axis that does not divide its dimension (a batch of 2 on 4 data devices,
1 kv head on 2 model devices) is not split over; with nothing to split, or
inside a `shard_map` already (manual axes), the kernel is called as it is. The decode
kernel (`call_decode`) is split the same way, by batch rows and kv heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax

from attnlab import axes
from attnlab.kernels.common import DecodeConfig
from attnlab.kernels.common import KernelConfig

P = jax.sharding.PartitionSpec


def call(kernel: Callable[..., jax.Array], q, k, v, bias_BH, q_seg, kv_seg,
         cfg: KernelConfig) -> jax.Array:
  """`kernel(q, k, v, bias_BH, q_seg, kv_seg, cfg)`, per shard when a mesh is in context.

  q [B, Lq, H, D], k and v [B, Lk, Hkv, D], bias_BH [B, H] or None, segment ids
  [B, L] or None; returns [B, Lq, H, Dv].
  """
  split = _split(q.shape[0], math.gcd(cfg.num_heads, cfg.num_kv_heads))
  if split is None:
    return kernel(q, k, v, bias_BH, q_seg, kv_seg, cfg)
  mesh, b, h, heads_split = split
  local_cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // heads_split,
                                  num_kv_heads=cfg.num_kv_heads // heads_split)
  seq_spec, bias_spec = P(b), P(b, h)
  qkv_spec = P(b, None, h, None)

  def per_shard(q, k, v, bias_BH, q_seg, kv_seg):
    return kernel(q, k, v, bias_BH, q_seg, kv_seg, local_cfg)

  return jax.shard_map(
      per_shard, mesh=mesh, out_specs=qkv_spec, check_vma=False,
      in_specs=(qkv_spec, qkv_spec, qkv_spec, bias_spec, seq_spec, seq_spec),
  )(q, k, v, bias_BH, q_seg, kv_seg)


def call_decode(partials: Callable[..., tuple], offset_B, q_rows, k, v, bias_rows,
                cfg: DecodeConfig) -> tuple:
  """The decode kernel's `partials(offset_B, q_rows, k, v, bias_rows, cfg)`, per shard when a
  mesh is in context: batch rows over the data axes, kv heads over the model axis.

  q_rows [B, Hkv, R, D] holds each kv head's whole GQA group, k and v [B, Lk, Hkv, D],
  bias_rows [B, Hkv, R] or None, offset_B [B]; the partials (acc [B, Hkv, S, R, Dv], and
  softmax's m and l [B, Hkv, S, R], else None) come back split the same way, so the merge
  over splits that follows needs no collective either.
  """
  split = _split(q_rows.shape[0], q_rows.shape[1])
  if split is None:
    return partials(offset_B, q_rows, k, v, bias_rows, cfg)
  mesh, b, h, _ = split
  rows, keys = P(b, h), P(b, None, h)

  def per_shard(offset_B, q_rows, k, v, bias_rows):
    return partials(offset_B, q_rows, k, v, bias_rows, cfg)

  return jax.shard_map(
      per_shard, mesh=mesh, check_vma=False, out_specs=(rows, rows, rows),
      in_specs=(P(b), rows, keys, keys, rows),
  )(offset_B, q_rows, k, v, bias_rows)


def _split(batch: int, heads: int):
  """How to split a kernel call over the mesh in context: (mesh, batch axes, head axes,
  head shards), the axes None where not split; None to call it whole (no mesh, inside a
  `shard_map` already, or no axis that divides the batch or the heads)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return None
  batch_axes = _dividing_axes(mesh, [a for a in axes.DATA_AXES if a in mesh.shape], batch)
  head_axes = _dividing_axes(mesh, [a for a in axes.HEAD_AXES if a in mesh.shape], heads)
  if not batch_axes and not head_axes:
    return None
  return (mesh, batch_axes or None, head_axes or None,
          math.prod(mesh.shape[a] for a in head_axes))


def _dividing_axes(mesh, names: list[str], size: int) -> tuple[str, ...]:
  """The longest prefix of the mesh axes `names` (of size > 1) whose product divides `size`."""
  chosen: list[str] = []
  for axis in names:
    if mesh.shape[axis] == 1:
      continue
    if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]):
      break
    chosen.append(axis)
  return tuple(chosen)
