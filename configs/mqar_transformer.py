r"""Transformer LM on multi-query associative recall (MQAR, Zoology): sigmoid vs softmax.

Each 32-token sequence lists 4 key-value pairs and then queries the 4 keys at
random positions; the model must output each key's value (loss and accuracy
only on those answer positions). Synthetic: example i of a split is a function of
(seed, split, i), so nothing is downloaded and any subset is reproducible.

  python train.py --config configs/mqar_transformer.py:sigmoid   # -> runs/mqar_transformer_sigmoid
  python train.py --config configs/mqar_transformer.py:softmax
  python train.py --config configs/mqar_transformer.py:sigmoid,train_examples=2000
  python eval.py  --config configs/mqar_transformer.py:sigmoid --workdir runs/mqar_transformer_sigmoid

Argument (after the colon, comma-separated):
  <kind>            attention kind (default sigmoid)
  quick             a few steps of a tiny model (tests; seconds)
  train_examples=N  train on the first N of the 100,000 training sequences

Expected (measured, seeds 0-2, 1,500 steps, 2 CPU cores; 2-4 min per run): sigmoid solves
the task (100% answer accuracy) with all 3 seeds by step 1,000; softmax with 1 of 3, the
other two on a ~54% plateau to the end. Per-seed table: docs/results.md, "Single runs".
"""

import ml_collections

from attnlab import configlib
from attnlab import experiment
from attnlab.data import DataConfig
from attnlab.data import MQARSpec
from attnlab.models import TransformerConfig
from attnlab.optim import OptimConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, attention="sigmoid", quick=False, train_examples=0)
  config = experiment.new_config(
      "train", model_name="transformer", batch_size=64, eval_batch_size=250, total_steps=1_500,
      log_every_steps=100, eval_every_steps=500, checkpoint_every_steps=500,
      keep_checkpoints=2, diagnostics_examples=16)

  config.data = configlib.from_dataclass(
      DataConfig,
      name="mqar",
      train_examples=args.train_examples or None,
      train_size=100_000,  # the synthetic "train" split
      eval_size=1_000,  # the synthetic "test" split: other sequences, same for every subset
      # 31 keys, 32 values; 4 pairs queried 4 times in 32 tokens: an induction
      # circuit solves it, and two layers learn one within a CPU budget.
      mqar=configlib.from_dataclass(MQARSpec, vocab_size=64, num_kv_pairs=4, num_queries=4,
                                    seq_len=32),
  )

  config.model = configlib.from_dataclass(
      TransformerConfig, exclude=("vocab_size", "max_len", "num_classes"),
      width=64, depth=2, num_heads=2,  # Zoology's smallest MQAR models: 2 layers
      attention=args.attention, positions="rope", causal=True,
      qk_norm="rms",  # stabilises sigmoid attention; kept for softmax (one difference only)
  )

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=3e-3, weight_decay=0.1,
                                          warmup_fraction=0.1)

  if args.quick:
    config.data.train_size = 512
    config.data.eval_size = 64
    config.data.mqar.update(vocab_size=32, num_kv_pairs=4, num_queries=4, seq_len=16)
    config.model.update(width=32, num_heads=2, depth=1)
    config.batch_size = 16
    config.total_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = None
    config.eval_batch_size = 32
    config.checkpoint_every_steps = 3
    config.progress_bar = False
    config.diagnostics_examples = 4
  return config.lock()
