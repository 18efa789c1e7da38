r"""Byte-level Transformer LM on tiny_shakespeare (1 MB of text): sigmoid vs softmax.

Tokens are UTF-8 bytes (vocabulary 256); windows of 256 bytes. Needs the TFDS
data prepared once (internet):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare tiny_shakespeare

  python train.py --config configs/shakespeare_char.py:sigmoid  # -> runs/shakespeare_char_sigmoid
  python train.py --config configs/shakespeare_char.py:softmax
  python eval.py  --config configs/shakespeare_char.py:sigmoid --workdir runs/shakespeare_char_sigmoid

Argument (after the colon, comma-separated):
  <kind>   attention kind (default sigmoid)
  quick    a few steps of a tiny model (tests; works on mocked data)

Expected (not measured on CPU: the tiny_shakespeare data is not on the
development machines, and 5,000 steps of this 6-layer model on 256-byte
windows would take hours on their 2 shared CPU cores): an estimate, not an
attnlab measurement: validation loss about 1.5 nats per byte after 5,000
steps (nanoGPT's character baseline reaches ~1.47 with a larger model); about
10 minutes on a GPU.
"""

import ml_collections

from attnlab import configlib
from attnlab import experiment
from attnlab.data import DataConfig
from attnlab.models import TransformerConfig
from attnlab.optim import OptimConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, attention="sigmoid", quick=False)
  config = experiment.new_config(
      "train", model_name="transformer", batch_size=64, eval_batch_size=64, total_steps=5_000,
      log_every_steps=100, eval_every_steps=1_000, checkpoint_every_steps=1_000,
      keep_checkpoints=2, diagnostics_examples=8)

  config.data = configlib.from_dataclass(
      DataConfig, name="tiny_shakespeare", train_split="train", eval_split="validation",
      seq_len=256)

  config.model = configlib.from_dataclass(
      TransformerConfig, exclude=("vocab_size", "max_len", "num_classes"),
      width=256, depth=6, num_heads=8, attention=args.attention, positions="rope", causal=True,
      qk_norm="rms", dropout_rate=0.1)

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=1e-3, weight_decay=0.1,
                                          b2=0.99)

  if args.quick:
    config.data.seq_len = 8
    config.model.update(width=32, depth=1, num_heads=2, dropout_rate=0.0)
    config.batch_size = 4
    config.total_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = None
    config.checkpoint_every_steps = 2
    config.eval_batch_size = 4
    config.progress_bar = False
    config.diagnostics_examples = 2
  return config.lock()
