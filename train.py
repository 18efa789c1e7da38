r"""Trains an attnlab experiment; resumes from the checkpoints in --workdir.

  python train.py                                   # ViT, sigmoid attention, bundled digits
  python train.py --config configs/digits_vit.py:softmax
  python train.py --config configs/mqar_transformer.py:sigmoid --config.optim.learning_rate=1e-3
  python train.py --config configs/digits_vit.py:sigmoid --workdir runs/mine --config.seed=1
  python train.py --config.data.train_examples=500  # -> runs/digits_vit_sigmoid/train_examples=500
  python train.py --config.model.qk_norm=none       # any field that may hold None takes none

Overrides that change what is trained name the default workdir (sorted
name=value pairs one level below runs/<config>_<arg>); log, eval and
checkpoint cadence, progress_bar and data.data_dir do not, so a run resumed
with another cadence finds its checkpoints.

Then: python eval.py with the same --config and overrides (or --workdir).

An invalid config is refused before the workdir is written. Expected failures
print one `Error: ...` line; ATTNLAB_TRACEBACK=1 shows the traceback.
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
