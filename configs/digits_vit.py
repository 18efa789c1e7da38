r"""ViT on the bundled `digits` data set (8x8 images, 1,500 train / 297 test): sigmoid vs softmax.

The default experiment of attnlab. Runs offline on a laptop CPU; the data set
is prepared from scikit-learn on first use.

  python train.py                                    # = this file, sigmoid
  python train.py --config configs/digits_vit.py:softmax --workdir runs/digits_vit_softmax
  python eval.py --config configs/digits_vit.py:sigmoid --workdir runs/digits_vit_sigmoid

Arguments (comma-separated, after the colon):
  sigmoid | softmax | any attention kind   which attention (default sigmoid)
  quick                                     a few steps of a tiny model (tests)
  train_examples=N                          train on N examples (nested subsets)

Expected (2-core CPU, jax 0.12): ~97% test accuracy for both kinds in about
2 minutes (sigmoid: see the report in benchmarks/results for measured figures).
`:quick` runs in seconds and only checks that everything fits together.
"""

import ml_collections

from attnlab import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, attention="sigmoid", quick=False, train_examples=0)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.data_dir = None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.train_split = "train"
  config.data.eval_split = "test"  # fixed: never changes with the training subset
  config.data.train_examples = args.train_examples or None  # first n of a fixed permutation
  config.data.subset_seed = 0
  config.data.seq_len = None
  config.data.train_size = None
  config.data.eval_size = None
  config.data.mqar = None

  config.model_name = "vit"
  config.model = ml_collections.ConfigDict()
  config.model.variant = "mu/2"  # width 64, depth 4, 4 heads, MLP 256; 2x2 patches -> 16 tokens
  config.model.attention = args.attention
  # Apple's recipe for stable sigmoid attention (arXiv 2409.04431): QK-norm;
  # kept for softmax too so that the two differ only in the attention kind.
  config.model.qk_norm = "rms"
  config.model.layer_scale = None
  config.model.pool = "gap"
  config.model.dropout_rate = 0.1  # 1,500 images: regularise

  config.batch_size = 128
  config.num_epochs = 60  # ~700 steps
  config.total_steps = None  # exactly one of total_steps / num_epochs / total_examples
  config.total_examples = None

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = None
  config.optim.warmup_fraction = 0.05
  config.optim.end_learning_rate_fraction = 0.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.05
  config.optim.grad_clip_norm = 1.0
  config.label_smoothing = 0.1

  config.log_every_steps = 50
  config.eval_every_steps = None  # None: evaluate at the end only
  config.eval_batch_size = 300
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.progress_bar = True
  config.diagnostics_examples = 64  # evaluation: attention statistics on this many test images

  if args.quick:
    config.model.variant = "mu/4"
    config.model.depth = 1
    config.model.width = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.batch_size = 32
    config.num_epochs = None
    config.total_steps = 6
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    config.eval_batch_size = 100
    config.progress_bar = False
    config.diagnostics_examples = 8
  return config.lock()
