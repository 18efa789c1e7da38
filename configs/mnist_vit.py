r"""ViT on MNIST or Fashion-MNIST (28x28 grey, 60,000 train / 10,000 test): sigmoid vs softmax.

Needs the TFDS data prepared once: Fashion-MNIST offline from Debian's package
(MNIST likewise from any folder with its IDX files: `mnist --from DIR`),

  sudo apt-get install dataset-fashion-mnist
  python -m attnlab.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist

or either with internet (TensorFlow only while writing):

  pip install 'attnlab[prepare]'
  python -m attnlab.data.prepare mnist fashion_mnist

  python train.py --config configs/mnist_vit.py:mnist,sigmoid        # -> runs/mnist_vit_mnist_sigmoid
  python train.py --config configs/mnist_vit.py:fashion_mnist,softmax
  python train.py --config configs/mnist_vit.py:mnist,sigmoid,train_examples=1000
  python eval.py  --config configs/mnist_vit.py:mnist,sigmoid --workdir runs/mnist_vit_mnist_sigmoid

Argument (after the colon, comma-separated; bare words fill dataset, then attention):
  mnist | fashion_mnist   the data set (default mnist)
  <kind>                  attention kind (default sigmoid)
  quick                   a few steps of a tiny model (tests; works on mocked data)
  train_examples=N        train on the first N of a fixed permutation (nested subsets)

Expected (not measured on CPU: the MNIST and Fashion-MNIST data are not on the
development machines, and 10 epochs would take about an hour on their 2
shared CPU cores): an estimate, not an attnlab measurement: ViT-mu/4 should
reach about 98-99% on MNIST and 88-90% on Fashion-MNIST in 10 epochs (4,690
steps); minutes on a GPU.
"""

import ml_collections

from attnlab import configlib
from attnlab import experiment
from attnlab.data import DataConfig
from attnlab.models import ViTConfig
from attnlab.optim import OptimConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, dataset="mnist", attention="sigmoid", quick=False,
                             train_examples=0)
  if args.dataset not in ("mnist", "fashion_mnist"):
    raise ValueError(f"configs/mnist_vit.py: dataset={args.dataset!r}; expected mnist or "
                     "fashion_mnist (CIFAR-10: configs/cifar10_vit.py).")
  config = experiment.new_config(
      "train", model_name="vit", batch_size=128, eval_batch_size=500, num_epochs=10,
      label_smoothing=0.1, log_every_steps=100, eval_every_steps=1_000,
      checkpoint_every_steps=1_000, keep_checkpoints=2)

  config.data = configlib.from_dataclass(
      DataConfig, name=args.dataset, train_split="train", eval_split="test",
      train_examples=args.train_examples or None)

  # mu = width 64, depth 4, 4 heads, MLP 256; /4 = 4x4 patches: 49 tokens.
  config.model = configlib.from_dataclass(
      ViTConfig, exclude=("num_classes", "image_size", "num_channels"), patch_size=None,
      attention=args.attention, qk_norm="rms", pool="gap", dropout_rate=0.1)
  config.model.variant = "mu/4"

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=2e-3, weight_decay=0.05)

  if args.quick:
    config.model.variant = "mu/7"
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
