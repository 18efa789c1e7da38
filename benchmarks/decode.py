"""Decoding speed with a KV cache: tokens/s of one decode step against the cache length.

    python benchmarks/decode.py [--lengths 1024,2048,4096,8192,16384,32768] [--batches 1,16]

One decode step of a small Transformer LM (`attnlab.models.decode`): one new token per
sequence attending to a cache of L tokens (its slots filled; the step sits at position
L - 1), for sigmoid and softmax, with the jnp path the model's "auto" impl takes off the
fused kernels (the blockwise scan from 2,048 keys on, below that the materialising
path: "unsplit"), with the split-key jnp impl (`key_splits` blocks run side by side, then
merged: "split") and, on a GPU, with the split-key Pallas decode kernel
(`kernels.decode_attention`, what a pallas model decodes with: "pallas"). Off a GPU the
kernel would run in Pallas interpret mode, which times the interpreter, so its columns
are skipped there (a note says so). A row for linear attention decodes from its recurrent
state: O(1) in L (the cache length only sets max_len), no split or kernel path. Every
row is measured in the same run; the table gives medians and the ratios split/unsplit,
pallas/split and sigmoid/softmax. CPU timings are noisy on shared machines: trust the
ratios.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from timing import median_ms  # benchmarks/timing.py

from attnlab import attention
from attnlab.attention import api
from attnlab.models import Transformer, TransformerConfig
from attnlab.models import decode
from attnlab.models.layers import KVCache

KINDS = ("sigmoid", "softmax")
RECURRENT_KIND = "linear"  # O(1) per token: its state does not grow with L


def step_ms(kind: str, length: int, batch: int, path: str, args) -> float:
  """Median ms of one decode step at position length - 1 of a cache of `length` slots.

  path: "unsplit" (the jnp impl "auto" picks off the kernels), "split" or "pallas".
  """
  cfg = TransformerConfig(width=args.width, depth=args.depth, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, vocab_size=256, max_len=length,
                          attention=kind, attention_impl="pallas" if path == "pallas" else "xla",
                          dtype=args.dtype)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  empty = decode.init_cache(model, batch)
  if isinstance(empty.cache, KVCache):
    noise = lambda x, s: jax.random.normal(jax.random.key(s), x.shape, x.dtype)  # noqa: E731
    cache = KVCache(noise(empty.cache.k_BLhD, 1), noise(empty.cache.v_BLhD, 2))
  else:  # a recurrent state: its size does not depend on the position
    cache = empty.cache
  state = decode.DecodeState(cache, jnp.int32(length - 1))
  if path == "split":
    impl = decode.decode_impl(model, args.key_splits)
  elif path == "pallas":
    impl = decode.decode_impl(model)  # the decode kernel for one token (DecodeImpl.for_tokens)
  else:
    impl = decode.DecodeImpl("chunked" if length >= api.AUTO_CHUNKED_MIN_KV_LEN else "xla")
  tokens_B1 = jnp.zeros((batch, 1), jnp.int32)
  # Jitted without donation: every timed call must see the same cache.
  step = jax.jit(lambda p, t, s: decode.step(graphdef, p, t, s, impl))
  return median_ms(step, (params, tokens_B1, state), args.repeats)


def table_columns(with_kernel: bool) -> list[tuple]:
  """The table's timed columns: (name, width, format, value(ms, softmax_ms, batch)), with
  `ms` this kind's step time per path and `softmax_ms` softmax's, one definition for the
  header and every row (the pallas columns only where the kernel runs)."""
  tok = lambda p: lambda ms, sm, batch: 1e3 * batch / ms[p]
  ratio = lambda p, q: lambda ms, sm, batch: ms[p] / ms[q]
  vs_softmax = lambda p: lambda ms, sm, batch: ms[p] / sm[p]
  kernel = lambda cols: cols if with_kernel else []
  return ([("unsplit ms", 10, ".2f", lambda ms, sm, b: ms["unsplit"]),
           ("split ms", 9, ".2f", lambda ms, sm, b: ms["split"])]
          + kernel([("pallas ms", 9, ".3f", lambda ms, sm, b: ms["pallas"])])
          + [("unsplit tok/s", 13, ".0f", tok("unsplit")), ("split tok/s", 11, ".0f", tok("split"))]
          + kernel([("pallas tok/s", 12, ".0f", tok("pallas"))])
          + [("split/unsplit t", 15, ".2f", ratio("split", "unsplit"))]
          + kernel([("pallas/split t", 14, ".2f", ratio("pallas", "split"))])
          + [("t/softmax unsplit", 17, ".2f", vs_softmax("unsplit")),
             ("t/softmax split", 15, ".2f", vs_softmax("split"))]
          + kernel([("t/softmax pallas", 16, ".2f", vs_softmax("pallas"))]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--key-splits", type=int, default=8)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default=None, help="also write the table to this file")
  args = parser.parse_args()

  device = jax.devices()[0]
  # The kernel's columns only where it runs natively (a GPU): interpret mode is no timing.
  with_kernel = (device.platform == "gpu"
                 and attention.pallas_decodes(1, args.width // args.heads))
  lines = [f"# attnlab decode benchmark | jax {jax.__version__} | {device.platform} "
           f"({device.device_kind}) x{jax.device_count()} | "
           f"{platform.processor() or platform.machine()} | LM width={args.width} "
           f"depth={args.depth} H={args.heads} Hkv={args.kv_heads} {args.dtype} | one token per "
           f"sequence per step | split: key_splits={args.key_splits} | median of {args.repeats}"]
  if not with_kernel:
    lines.append(f"# pallas: skipped on platform {device.platform!r} (the decode kernel runs "
                 "natively on GPU only; interpret mode would time the interpreter)")
  columns = table_columns(with_kernel)
  header = " | ".join([f"{'L':>6}", f"{'B':>3}", f"{'kind':<8}"]
                      + [f"{name:>{width}}" for name, width, _, _ in columns])
  lines += [header, "-" * len(header)]
  emit(lines, args.out, mode="w")
  paths = ("unsplit", "split") + (("pallas",) if with_kernel else ())
  for length in (int(x) for x in args.lengths.split(",")):
    for batch in (int(x) for x in args.batches.split(",")):
      t = {(kind, path): step_ms(kind, length, batch, path, args)
           for kind in KINDS for path in paths}
      for kind in KINDS:
        ms = {p: t[kind, p] for p in paths}
        softmax_ms = {p: t["softmax", p] for p in paths}
        emit([" | ".join([f"{length:>6}", f"{batch:>3}", f"{kind:<8}"]
                         + [f"{value(ms, softmax_ms, batch):>{width}{fmt}}"
                            for _, width, fmt, value in columns])], args.out)
      # Linear attention: one recurrent-state step, whatever L (only the unsplit column).
      rec = step_ms(RECURRENT_KIND, length, batch, "unsplit", args)
      emit([f"{length:>6} | {batch:>3} | {RECURRENT_KIND:<8} | {rec:>10.2f} | "
            f"{'recurrent state: O(1) per token, no split or kernel path':<}"], args.out)


def emit(lines: list[str], out: str | None, mode: str = "a") -> None:
  for line in lines:
    print(line, flush=True)
  if out is not None:
    with open(out, mode) as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
