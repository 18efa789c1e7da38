r"""Sample efficiency of sigmoid vs softmax attention: a ViT on CIFAR-10. For a GPU.

Needs the TFDS data prepared once (internet; TensorFlow only while writing):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare cifar10

  python train.py --config configs/sample_efficiency/cifar10.py         # -> runs/sample_efficiency_cifar10
  python train.py --config configs/sample_efficiency/cifar10.py:quick   # tests (works on mocked data)
  python eval.py  --config configs/sample_efficiency/cifar10.py         # re-render the report

Argument (after the colon, comma-separated): quick; all (every attention kind).

Cells: the first n of one fixed permutation of the 45,000 training images left
after a fixed 5,000-image validation split, n = 500 ... 45,000 (7 sizes), 3
paired seeds; scored on the fixed 10,000-image test split. Budget rule: 50
epochs with at least 5,000 steps (batch 256). No augmentation (studies hold
the pool on the device: 553 MB as float32), so small subsets overfit: the
validation split picks each cell's best step.

Expected (not measured on CPU: the CIFAR-10 data is not on the development
machines, and 42 cells of ViT-Ti/4 would take weeks on their 2 shared CPU
cores): an estimate, not an attnlab measurement: test error from about 65% at
n = 500 to about 25-30% at n = 45,000; several GPU-hours.
"""

import ml_collections

from attnlab import configlib
from attnlab import experiment
from attnlab.data import DataConfig
from attnlab.models import ViTConfig
from attnlab.optim import OptimConfig
from attnlab.studies.study import StudyConfig

ALL_KINDS = ("sigmoid", "softmax", "relu", "softplus", "linear", "polynomial", "gaussian")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, quick=False, all=False)
  # A study: the single run's seed and its log, eval and checkpoint cadence do not
  # apply (`experiment.SINGLE_RUN_FIELDS`); it sets its own in config.study.
  config = experiment.new_config(
      "study", model_name="vit", batch_size=256, eval_batch_size=500,
      num_epochs=50, label_smoothing=0.1)

  config.study = configlib.from_dataclass(
      StudyConfig, kinds=ALL_KINDS if args.all else ("sigmoid", "softmax"),
      train_sizes=(500, 1500, 4000, 8000, 15_000, 30_000, 45_000), seeds=(0, 1, 2),
      min_steps=5_000, eval_every_steps=500, checkpoint_every_steps=1_000, target_error=0.4,
      compare=("sigmoid", "softmax"), max_cells_per_group=21)

  config.data = configlib.from_dataclass(
      DataConfig, name="cifar10", train_split="train", eval_split="test",
      validation_examples=5_000)

  config.model = configlib.from_dataclass(
      ViTConfig, exclude=("num_classes", "image_size", "num_channels"), patch_size=None,
      attention="sigmoid", qk_norm="rms", pool="gap", dropout_rate=0.1)
  config.model.variant = "Ti/4"

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=1e-3, weight_decay=0.05)

  if args.quick:
    config.study.update(train_sizes=(8, 16), seeds=(0, 1), min_steps=4, eval_every_steps=2,
                        checkpoint_every_steps=2, bootstrap=50, progress_bar=False)
    config.data.validation_examples = 8
    config.model.variant = "mu/8"
    config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
    config.batch_size = 8
    config.num_epochs = 1.0
    config.eval_batch_size = 8
  return config.lock()
