r"""ViT on CIFAR-10 (32x32 colour, 50,000 train / 10,000 test): sigmoid vs softmax. For a GPU.

Needs the TFDS data prepared once (internet; TensorFlow only while writing):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare cifar10

  python train.py --config configs/cifar10_vit.py:sigmoid      # -> runs/cifar10_vit_sigmoid
  python train.py --config configs/cifar10_vit.py:softmax
  python eval.py  --config configs/cifar10_vit.py:sigmoid --workdir runs/cifar10_vit_sigmoid

Argument (after the colon, comma-separated):
  <kind>            attention kind (default sigmoid)
  quick             a few steps of a tiny model (tests; works on mocked data)
  train_examples=N  train on the first N of a fixed permutation (nested subsets)

Expected (not measured on CPU: the CIFAR-10 data is not on the development
machines, and 100 epochs of ViT-Ti/4 would take days on their 2 shared CPU
cores): an estimate, not an attnlab measurement: without data augmentation a
small ViT overfits CIFAR-10; ViT-Ti/4 for 100 epochs should land around 70-80%
test accuracy, in about 20 minutes on one modern GPU.
"""

import ml_collections

from attnlab import configlib
from attnlab import experiment
from attnlab.data import DataConfig
from attnlab.models import ViTConfig
from attnlab.optim import OptimConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, attention="sigmoid", quick=False, train_examples=0)
  config = experiment.new_config(
      "train", model_name="vit", batch_size=256, eval_batch_size=500, num_epochs=100,
      label_smoothing=0.1, log_every_steps=100, eval_every_steps=2_000,
      checkpoint_every_steps=2_000, keep_checkpoints=2)

  config.data = configlib.from_dataclass(
      DataConfig, name="cifar10", train_split="train", eval_split="test",
      train_examples=args.train_examples or None)

  # Ti = width 192, depth 12, 3 heads, MLP 768; /4 = 4x4 patches: 64 tokens.
  config.model = configlib.from_dataclass(
      ViTConfig, exclude=("num_classes", "image_size", "num_channels"), patch_size=None,
      attention=args.attention, qk_norm="rms", pool="gap", dropout_rate=0.1)
  config.model.variant = "Ti/4"

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=1e-3, weight_decay=0.05)

  if args.quick:
    config.model.variant = "mu/8"
    config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
    config.batch_size = 8
    config.num_epochs = None
    config.total_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = None
    config.checkpoint_every_steps = 2
    config.eval_batch_size = 8
    config.progress_bar = False
    config.diagnostics_examples = 4
  return config.lock()
