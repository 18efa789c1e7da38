"""Which fused-kernel backend, and which tiles, `flash_attention` picks by default on a GPU.

The answer is measured, never assumed: `tuned_gpu.json` (next to this file) holds, per
device kind (`jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3") and per shape class
(kind, dtype, padded head dim, causal or full), the backend whose forward+backward was
faster and the Mosaic GPU tiles that made it so. `benchmarks/tune_mgpu.py` writes it on
the GPU, side by side with the Triton kernel; a device or shape class it has not measured
keeps the Triton kernel ("gpu"). Explicit `backend=` / block arguments always win.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

TABLE_PATH = pathlib.Path(__file__).with_name("tuned_gpu.json")
# The options a table entry may set besides "backend" (flash_attention's own names).
TUNED_OPTIONS = ("block_q", "block_k", "num_stages")


def device_kind() -> str:
  """This process's first device's kind, the table's outer key."""
  return jax.devices()[0].device_kind


def shape_class(kind: str, dtype: Any, head_dim: int, is_causal: bool) -> str:
  """The table's key for a call: e.g. "sigmoid/bfloat16/d128/causal"."""
  return f"{kind}/{jnp.dtype(dtype).name}/d{head_dim}/{'causal' if is_causal else 'full'}"


@functools.cache
def load_table(path: str = str(TABLE_PATH)) -> dict[str, Any]:
  """The committed measurements ({"devices": {device_kind: {shape_class: entry}}})."""
  table = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  if not isinstance(table.get("devices"), dict):
    raise ValueError(f"{path}: expected a 'devices' mapping; rerun benchmarks/tune_mgpu.py.")
  return table


def choice(device_kind: str, kind: str, dtype: Any, head_dim: int, is_causal: bool,
           table: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """The measured winner for this device and shape class as flash_attention options
  ({"backend": "mgpu", "block_k": 128, "num_stages": 2, ...}), or None (not measured)."""
  table = load_table() if table is None else table
  entry = table["devices"].get(device_kind, {}).get(shape_class(kind, dtype, head_dim,
                                                                is_causal))
  if not entry:
    return None
  return {"backend": entry["backend"],
          **{k: entry[k] for k in TUNED_OPTIONS if entry.get(k) is not None}}
