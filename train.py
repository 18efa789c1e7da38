r"""Trains an attnlab experiment or sample-efficiency study; resumes from what --workdir holds.

  python train.py                      # the digits study: softmax vs sigmoid, 6 sizes x 3 seeds
  python train.py --config configs/sample_efficiency/digits.py:quick   # the same in seconds
  python train.py --config configs/digits_vit.py:softmax               # one run -> runs/digits_vit_softmax
  python train.py --config configs/mqar_transformer.py:sigmoid --config.optim.learning_rate=1e-3
  python train.py --config configs/digits_vit.py --workdir runs/mine --config.seed=1
  python train.py --config configs/digits_vit.py --config.data.train_examples=500
  python train.py --config configs/digits_vit.py --config.model.qk_norm=none   # =none: None
  python train.py --config configs/digits_vit.py --config.mesh.fsdp=-1   # FSDP over every device
  python train.py --jax_distributed ...   # one of several processes: docs/distributed.md

The config's engine (`config.engine`, `configlib.ENGINES`) says what runs: "train"
one run; "study" (configs/sample_efficiency/) a study: every
(kind, training-set size, seed) cell, trained in vmapped groups, then the
report (report.md, results.json/csv, plots) in the workdir. A rerun skips the
cells already recorded and resumes an unfinished group from its checkpoint.

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
from attnlab import configlib
from attnlab import train
from attnlab.moe import study as moe_study
from attnlab.studies import study


def main(argv):
  def run(config, workdir):
    engine = configlib.engine(config)
    if engine == "moe":
      moe_study.print_summary(moe_study.run(config, workdir))
    elif engine == "study":
      cli.report_study(study.run(config, workdir))
    else:
      cli.report_training(train.train_and_evaluate(config, workdir))

  cli.run_main(argv, run)


if __name__ == "__main__":
  cli.define_flags(default_config="configs/sample_efficiency/digits.py", distributed=True)
  app.run(main, flags_parser=cli.parse_flags)
