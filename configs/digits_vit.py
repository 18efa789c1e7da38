r"""ViT on the bundled `digits` data set (8x8 images, 1,500 train / 297 test): sigmoid vs softmax.

One run on the whole training split (the study over subset sizes is
configs/sample_efficiency/digits.py, the default job); runs offline on a
laptop CPU; the data set is prepared from scikit-learn on first use.

  python train.py --config configs/digits_vit.py:sigmoid      # -> runs/digits_vit_sigmoid
  python train.py --config configs/digits_vit.py:softmax      # -> runs/digits_vit_softmax
  python eval.py  --config configs/digits_vit.py:sigmoid --workdir runs/digits_vit_sigmoid

Argument (after the colon, comma-separated):
  <kind>            attention kind: sigmoid (default), softmax, relu, ...
  quick             a few steps of a tiny model (tests; seconds)
  train_examples=N  train on the first N of a fixed permutation (nested subsets)

Expected (measured, seeds 0-4, 1,172 steps = 100 epochs, 2 shared CPU cores, jax 0.12.0.1;
about 2 min per run): test accuracy 97.2 ± 0.7 % (sigmoid) and 97.4 ± 0.5 % (softmax), mean
± std over seeds: level on the full data. Per-seed table and the cross-machine caveat:
docs/results.md, "Single runs".
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
      "train", model_name="vit", batch_size=128, eval_batch_size=300,
      num_epochs=100,  # = 1,172 steps; exactly one of num_epochs / total_steps / total_examples
      label_smoothing=0.1, log_every_steps=50,
      eval_every_steps=None,  # None: evaluate at the end only
      checkpoint_every_steps=200, keep_checkpoints=2)

  config.data = configlib.from_dataclass(
      DataConfig,
      name="digits",
      train_split="train",
      eval_split="test",  # fixed: never changes with the training subset
      train_examples=args.train_examples or None,
  )

  # Sizes left at None come from `variant`: mu = width 64, depth 4, 4 heads,
  # MLP 256; /2 = 2x2 patches, so 16 tokens per 8x8 image.
  config.model = configlib.from_dataclass(
      ViTConfig, exclude=("num_classes", "image_size", "num_channels"), patch_size=None,
      attention=args.attention,
      # QK-norm: Apple's recipe for stable sigmoid attention (arXiv
      # 2409.04431); kept for softmax so the two differ only in the kind.
      qk_norm="rms",
      pool="gap",
      dropout_rate=0.2,  # 1,500 training images: regularise (0.1 gave ~1 point less)
  )
  config.model.variant = "mu/2"

  config.optim = configlib.from_dataclass(OptimConfig, learning_rate=3e-3, weight_decay=0.05)

  if args.quick:
    config.model.variant = "mu/4"
    config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
    config.batch_size = 32
    config.num_epochs = None
    config.total_steps = 8
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_batch_size = 100
    config.progress_bar = False
    config.diagnostics_examples = 8
  return config.lock()
