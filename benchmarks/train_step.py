r"""Throughput and model-FLOP utilisation of the ViT train step: softmax vs sigmoid attention.

Times attnlab's jitted train step (forward, backward, AdamW update; the same
function `python train.py` runs) for each attention kind, at the default
experiment's shape and a larger one, and measures the machine's float32
matmul rate in the same run as the reference for MFU:

  MFU = (model FLOPs per step / median step time) / matmul FLOP/s

Model FLOPs count the matmuls of forward + backward (3 x forward): dense
projections, patch embedding, head, and attention scores / weighted sum
(4 * N^2 * width per layer). CPU numbers are noisy on shared cores: trust the
ratios, which are measured side by side.

  python benchmarks/train_step.py                    # table to stdout
  python benchmarks/train_step.py --repeats 9 --kinds softmax,sigmoid,relu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import timing  # benchmarks/timing.py (this script runs as `python benchmarks/train_step.py`)

from attnlab import model_fns
from attnlab import models
from attnlab import optim

# (name, image size, channels, variant, batch): the default digits experiment and a CIFAR-sized one.
SHAPES = (
    ("digits mu/2", 8, 1, "mu/2", 128),
    ("32x32 mu/4", 32, 3, "mu/4", 64),
)


def matmul_rate(n: int = 1024, repeats: int = 7) -> float:
  """Median float32 FLOP/s of an n x n @ n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  seconds = statistics.median(timing.run_times(jax.jit(lambda x, y: x @ y), (a, a), repeats))
  return 2 * n**3 / seconds


def model_flops_per_example(cfg: models.ViTConfig) -> float:
  """Matmul FLOPs of forward + backward for one image (3 x forward)."""
  (gh, gw), (ph, pw) = cfg.grid, cfg.patch_size
  patches = gh * gw
  tokens = patches + (1 if cfg.pool == "tok" else 0)
  w, h, kv, d, m = cfg.width, cfg.num_heads, cfg.effective_num_kv_heads, cfg.head_dim, cfg.effective_mlp_dim
  per_token_layer = 2 * w * (h * d + 2 * kv * d) + 2 * h * d * w + 4 * w * m
  attention_layer = 4 * tokens * tokens * h * d
  forward = (cfg.depth * (tokens * per_token_layer + attention_layer)
             + 2 * patches * ph * pw * cfg.num_channels * w + 2 * w * cfg.num_classes)
  return 3.0 * forward


def build_step(kind: str, image: int, channels: int, variant: str, batch: int):
  """A compiled train step and its inputs for one attention kind and shape."""
  cfg = models.ViTConfig.from_variant(variant, num_classes=10, image_size=image,
                                      num_channels=channels, attention=kind, qk_norm="rms",
                                      pool="gap")
  fns = model_fns.make_model_fns(cfg, optim.OptimConfig(), 1000)
  rng = np.random.default_rng(0)
  batch_data = {
      "inputs": jnp.asarray(rng.uniform(-1, 1, (batch, image, image, channels)), jnp.float32),
      "targets": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
      "weights": jnp.ones((batch,), jnp.float32),
  }
  step = jax.jit(fns.train_step, donate_argnums=0)
  state, metrics = step(jax.jit(fns.init)(0), batch_data)  # compile
  jax.block_until_ready(metrics)
  return cfg, step, [state], batch_data


def time_steps(step, holder, batch_data, steps: int) -> float:
  """Seconds per step over `steps` consecutive steps (the state stays in `holder`)."""
  state = holder[0]
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch_data)
  jax.block_until_ready((state, metrics))
  holder[0] = state
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kinds", default="softmax,sigmoid")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  kinds = args.kinds.split(",")

  peak = matmul_rate()
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}")
  print(f"float32 matmul 1024^3: {peak / 1e9:.1f} GFLOP/s (median of 7): the MFU reference\n")
  header = (f"{'shape':<12} {'batch':>5} {'kind':<8} {'ms/step':>8} {'examples/s':>10} "
            f"{'GFLOP/s':>8} {'MFU':>6} {'vs ' + kinds[0]:>11}")
  print(header)
  print("-" * len(header))
  for name, image, channels, variant, batch in SHAPES:
    built = {kind: build_step(kind, image, channels, variant, batch) for kind in kinds}
    times = {kind: [] for kind in kinds}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every kind alike
      for kind, (_, step, holder, batch_data) in built.items():
        times[kind].append(time_steps(step, holder, batch_data, args.steps))
    base = None
    for kind in kinds:
      cfg, seconds = built[kind][0], statistics.median(times[kind])
      flops = model_flops_per_example(cfg) * batch / seconds
      base = base or seconds
      print(f"{name:<12} {batch:>5} {kind:<8} {seconds * 1e3:>8.2f} {batch / seconds:>10.0f} "
            f"{flops / 1e9:>8.2f} {flops / peak:>6.1%} {base / seconds:>10.2f}x")
  print("\nvs <first kind>: its median step time / this one's (> 1: faster). Medians of "
        f"{args.repeats} interleaved repeats of {args.steps} steps, after a compiling call.")


if __name__ == "__main__":
  main()
