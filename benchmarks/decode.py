"""Decoding speed with a KV cache: tokens/s of one decode step against the cache length.

    python benchmarks/decode.py [--lengths 1024,2048,4096,8192,16384,32768] [--batches 1,16]

One decode step of a small Transformer LM (`attnlab.models.decode`): one new token per
sequence attending to a cache of L tokens (its slots filled; the step sits at position
L - 1), for sigmoid and softmax, with the model's own attention impl ("auto": on CPU
the blockwise scan from 2,048 keys on, below that the materialising path) and with the
split-key impl (`key_splits` blocks run side by side, then merged). Every row is
measured in the same run; the table gives medians and the ratios split/unsplit and
sigmoid/softmax. CPU timings are noisy on shared machines: trust the ratios.
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from timing import median_ms  # benchmarks/timing.py

from attnlab.models import Transformer, TransformerConfig
from attnlab.models import decode
from attnlab.models.layers import KVCache

KINDS = ("sigmoid", "softmax")


def step_ms(kind: str, length: int, batch: int, key_splits: int | None, args) -> float:
  """Median ms of one decode step at position length - 1 of a cache of `length` slots."""
  cfg = TransformerConfig(width=args.width, depth=args.depth, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, vocab_size=256, max_len=length,
                          attention=kind)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  empty = decode.init_cache(model, batch)
  noise = lambda x, s: jax.random.normal(jax.random.key(s), x.shape, x.dtype)  # noqa: E731
  state = decode.DecodeState(KVCache(noise(empty.cache.k_BLhD, 1), noise(empty.cache.v_BLhD, 2)),
                             jnp.int32(length - 1))
  impl = decode.decode_impl(model, key_splits)
  tokens_B1 = jnp.zeros((batch, 1), jnp.int32)
  # Jitted without donation: every timed call must see the same cache.
  step = jax.jit(lambda p, t, s: decode.step(graphdef, p, t, s, impl))
  return median_ms(step, (params, tokens_B1, state), args.repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--key-splits", type=int, default=8)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()

  print(f"# attnlab decode benchmark | jax {jax.__version__} | {jax.devices()[0].platform} x"
        f"{jax.device_count()} | {platform.processor() or platform.machine()} | LM width="
        f"{args.width} depth={args.depth} H={args.heads} Hkv={args.kv_heads} float32 | one "
        f"token per sequence per step | split: key_splits={args.key_splits} | median of "
        f"{args.repeats}")
  header = (f"{'L':>6} | {'B':>3} | {'kind':<8} | {'unsplit ms':>10} | {'split ms':>9} | "
            f"{'unsplit tok/s':>13} | {'split tok/s':>11} | {'split/unsplit t':>15} | "
            f"{'t/softmax unsplit':>17} | {'t/softmax split':>15}")
  print(header)
  print("-" * len(header))
  for length in (int(x) for x in args.lengths.split(",")):
    for batch in (int(x) for x in args.batches.split(",")):
      rows = {(kind, splits): step_ms(kind, length, batch, splits, args)
              for kind in KINDS for splits in (None, args.key_splits)}
      for kind in KINDS:
        unsplit, split = rows[kind, None], rows[kind, args.key_splits]
        print(f"{length:>6} | {batch:>3} | {kind:<8} | {unsplit:>10.2f} | {split:>9.2f} | "
              f"{1e3 * batch / unsplit:>13.0f} | {1e3 * batch / split:>11.0f} | "
              f"{split / unsplit:>15.2f} | {unsplit / rows['softmax', None]:>17.2f} | "
              f"{split / rows['softmax', args.key_splits]:>15.2f}", flush=True)


if __name__ == "__main__":
  main()
