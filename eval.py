r"""Evaluates the latest (or --step) checkpoint of a run: loss, accuracy, attention diagnostics.

  python eval.py                                     # the default run (runs/digits_vit_sigmoid)
  python eval.py --config configs/digits_vit.py:softmax --workdir runs/digits_vit_softmax
  python eval.py --config configs/mqar_transformer.py:sigmoid --workdir runs/mqar --attention_png
  python eval.py --config.data.train_examples=500   # runs/digits_vit_sigmoid/train_examples=500

Writes <workdir>/eval_<step>.json (and attention_maps/*.png with --attention_png).
Refuses a config that differs from the run's config.json in what is trained,
and a workdir with no checkpoint (it is never created). Expected failures print
one `Error: ...` line; ATTNLAB_TRACEBACK=1 shows the traceback.
"""

from absl import app
from absl import flags

from attnlab import cli
from attnlab import evaluate

_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_PNG = flags.DEFINE_bool("attention_png", False, "Also save attention maps as PNG files.")


def main(argv):
  cli.run_main(argv, lambda config, workdir: evaluate.evaluate(
      config, workdir, _STEP.value, attention_pngs=_PNG.value))


if __name__ == "__main__":
  cli.define_flags(default_config="configs/digits_vit.py:sigmoid")
  app.run(main, flags_parser=cli.parse_flags)
