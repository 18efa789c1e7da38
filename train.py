r"""Trains an attnlab experiment; resumes from the checkpoints in --workdir.

  python train.py                                   # ViT, sigmoid attention, bundled digits
  python train.py --config configs/digits_vit.py:softmax
  python train.py --config configs/mqar_transformer.py:sigmoid --config.optim.learning_rate=1e-3
  python train.py --config configs/digits_vit.py:sigmoid --workdir runs/mine --config.seed=1

Then: python eval.py with the same --config and --workdir.
"""

from absl import app

from attnlab import cli
from attnlab import train


def main(argv):
  cli.run_main(argv, lambda config, workdir: cli.report_training(
      train.train_and_evaluate(config, workdir)))


if __name__ == "__main__":
  cli.define_flags(default_config="configs/digits_vit.py:sigmoid")
  app.run(main, flags_parser=cli.parse_flags)
