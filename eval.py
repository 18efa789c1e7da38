r"""Evaluates a run's checkpoint, or re-renders a study's report from its recorded cells.

  python eval.py                                     # the default study's report (runs/sample_efficiency_digits)
  python eval.py --config configs/sample_efficiency/digits.py --config.study.target_error=0.05
  python eval.py --config configs/digits_vit.py:softmax --workdir runs/digits_vit_softmax
  python eval.py --config configs/mqar_transformer.py:sigmoid --workdir runs/mqar --attention_png
  python eval.py --config configs/shakespeare_char.py:sigmoid --workdir runs/shakespeare_char_sigmoid --samples 4
  python eval.py --config configs/digits_vit.py --config.data.train_examples=500

A single run: writes <workdir>/eval_<step>.json (and attention_maps/*.png with
--attention_png) from the latest (or --step) checkpoint. A study: rewrites
report.md, results.json/csv and the plots from <workdir>/cells/ without
training (report settings such as study.target_error may differ from the
training run's). --samples N (language models) also prints N generated sequences.
Refuses a config that differs from the run's config.json in what is trained,
a workdir with nothing to evaluate (it is never created), and the flags of a
single run (--samples, --temperature, --step, --attention_png) with a study. Expected failures
print one `Error: ...` line; ATTNLAB_TRACEBACK=1 shows the traceback.
"""

from absl import app
from absl import flags

from attnlab import cli
from attnlab import configlib
from attnlab import evaluate
from attnlab.moe import study as moe_study
from attnlab.studies import study

_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
_PNG = flags.DEFINE_bool("attention_png", False, "Also save attention maps as PNG files.")
_SAMPLES = flags.DEFINE_integer("samples", 0, "A language model run: also print this many "
                                "generated sequences (prompt: the first quarter of an "
                                "evaluation window; text for byte-level data).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature of --samples "
                                  "(0 = greedy).")
# The flags that act on one run's checkpoint. A study's report is re-rendered from its
# recorded cells without loading any model, so there they would silently do nothing.
_RUN_ONLY_FLAGS = (_SAMPLES, _TEMPERATURE, _STEP, _PNG)


def _refuse_run_only_flags(what: str) -> None:
  given = [f"--{holder.name}" for holder in _RUN_ONLY_FLAGS if flags.FLAGS[holder.name].present]
  if not given:
    return
  named = given[0] if len(given) == 1 else ", ".join(given[:-1]) + " and " + given[-1]
  acts, them = ("acts", "it") if len(given) == 1 else ("act", "them")
  raise configlib.ConfigError(
      f"{named} {acts} on one trained run's checkpoint, but --config is {what}, whose report "
      f"eval.py re-renders from the recorded cells without loading a model; drop {them}, or "
      "pass the --config and --workdir of a single run (e.g. configs/shakespeare_char.py:sigmoid "
      "for --samples).")


def main(argv):
  def run(config, workdir):
    engine = configlib.engine(config)
    if engine == "moe":
      _refuse_run_only_flags("an MoE study")
      moe_study.print_summary(moe_study.render(config, workdir))
    elif engine == "study":
      _refuse_run_only_flags("a study")
      cli.report_study(study.render(config, workdir))
    else:
      evaluate.evaluate(config, workdir, _STEP.value, attention_pngs=_PNG.value,
                        samples=_SAMPLES.value, temperature=_TEMPERATURE.value)

  cli.run_main(argv, run)


if __name__ == "__main__":
  cli.define_flags(default_config="configs/sample_efficiency/digits.py")
  app.run(main, flags_parser=cli.parse_flags)
