r"""Sample efficiency of sigmoid vs softmax attention: a ViT on MNIST or Fashion-MNIST. For a GPU.

Needs the TFDS data prepared once: Fashion-MNIST offline from Debian's package
(MNIST likewise from any folder with its IDX files: `mnist --from DIR`),

  sudo apt-get install dataset-fashion-mnist
  python -m attnlab.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist

or either with internet (TensorFlow only while writing):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare mnist fashion_mnist

  python train.py --config configs/sample_efficiency/mnist.py              # MNIST -> runs/sample_efficiency_mnist
  python train.py --config configs/sample_efficiency/mnist.py:fashion_mnist
  python train.py --config configs/sample_efficiency/mnist.py:quick        # tests (works on mocked data)
  python eval.py  --config configs/sample_efficiency/mnist.py              # re-render the report

Argument (after the colon, comma-separated): mnist | fashion_mnist (the data
set); quick; all (every attention kind).

Cells: the first n of one fixed permutation of the 55,000 training images left
after a fixed 5,000-image validation split, n = 100 ... 55,000 (8 sizes), 3
paired seeds; scored on the fixed 10,000-image test split. Budget rule: 10
epochs with at least 2,000 steps (batch 128). The whole pool (188 MB as
float32) is held on the device.

Expected (not measured on CPU: the MNIST data is not on the development
machines, and the 48 cells would take about a day on their 2 shared CPU
cores): an estimate, not an attnlab measurement: test error from about 30% at
n = 100 to about 1.5% at n = 55,000 for both kinds; half an hour on one GPU.
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
  args = configlib.parse_arg(arg, dataset="mnist", quick=False, all=False)
  if args.dataset not in ("mnist", "fashion_mnist"):
    raise ValueError(f"configs/sample_efficiency/mnist.py: dataset={args.dataset!r}; expected "
                     "mnist or fashion_mnist.")
  # A study: the single run's seed and its log, eval and checkpoint cadence do not
  # apply (`experiment.SINGLE_RUN_FIELDS`); it sets its own in config.study.
  config = experiment.new_config(
      "study", model_name="vit", batch_size=128, eval_batch_size=500,
      num_epochs=10, label_smoothing=0.1)

  config.study = configlib.from_dataclass(
      StudyConfig, kinds=ALL_KINDS if args.all else ("sigmoid", "softmax"),
      train_sizes=(128, 300, 1000, 3000, 10_000, 20_000, 40_000, 55_000), seeds=(0, 1, 2),
      min_steps=2_000, eval_every_steps=250, checkpoint_every_steps=500, target_error=0.03,
      compare=("sigmoid", "softmax"))

  config.data = configlib.from_dataclass(
      DataConfig, name=args.dataset, train_split="train", eval_split="test",
      validation_examples=5_000)

  # mu = width 64, depth 4, 4 heads, MLP 256; /4 = 4x4 patches: 49 tokens.
  config.model = configlib.from_dataclass(
      ViTConfig, exclude=("num_classes", "image_size", "num_channels"), patch_size=None,
      attention="sigmoid", qk_norm="rms", pool="gap", dropout_rate=0.1)
  config.model.variant = "mu/4"

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=2e-3, weight_decay=0.05)

  if args.quick:
    config.study.update(train_sizes=(8, 16), seeds=(0, 1), min_steps=4, eval_every_steps=2,
                        checkpoint_every_steps=2, bootstrap=50, progress_bar=False)
    config.data.validation_examples = 8
    config.model.variant = "mu/7"
    config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
    config.batch_size = 8
    config.num_epochs = 1.0
    config.eval_batch_size = 8
  return config.lock()
