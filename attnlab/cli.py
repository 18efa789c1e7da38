"""Flags shared by the thin entry points train.py and eval.py.

`--config path.py[:arg]` loads `get_config(arg)` from an experiment file
(ml_collections config_flags); `--config.a.b=value` overrides a field, and a
field that does not exist is an error that names the nearest valid one. A
field that may hold None takes `--config.a.b=none` (see attnlab.configlib).
Overrides that change what is trained name the default workdir:
`--config.data.train_examples=500` -> runs/digits_vit_sigmoid/train_examples=500.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

from absl import flags
from absl import logging
from ml_collections import config_flags

from attnlab import configlib
from attnlab.data import DatasetNotPreparedError

FLAGS = flags.FLAGS
_CONFIG = "config"


def define_flags(*, default_config: str, flag_values: flags.FlagValues = FLAGS,
                 argv: list[str] | None = None) -> None:
  """Defines --config and --workdir (call before app.run).

  Args:
    default_config: config file (and :arg) used without --config, relative to
      the repository root.
    flag_values: where to define them (tests pass their own FlagValues).
    argv: the command line whose --config.x overrides to read (None: sys.argv,
      read when parsed).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    config_flags.DEFINE_config_file(
        _CONFIG, os.path.join(root, default_config), "Experiment config: path.py[:arg].",
        flag_values=flag_values, lock_config=True, sys_argv=argv)
  except (AttributeError, KeyError) as e:  # config_flags applies --config.x overrides here too
    _exit_bad_override(e)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: "
                      "runs/<config name>[_<arg>][/<overrides that change what is trained>].",
                      flag_values=flag_values)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown --config.<field>."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    if isinstance(e.__cause__, (AttributeError, KeyError)):
      _exit_bad_override(e.__cause__)
    sys.exit(f"{os.path.basename(argv[0])}: {e}")
  except (AttributeError, KeyError) as e:
    _exit_bad_override(e)


def _exit_bad_override(e: BaseException) -> None:
  message = str(e.args[0] if e.args else e)
  message = message.strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
  sys.exit(f"Error: unknown config field in a --config.<field>=<value> override: {message}")


def config_and_workdir(flag_values: flags.FlagValues = FLAGS) -> tuple[Any, str]:
  """The parsed config and the workdir (default: `default_workdir`)."""
  config = flag_values[_CONFIG].value
  workdir = flag_values.workdir
  if workdir is None:
    workdir = default_workdir(flag_values[_CONFIG].config_filename, config)
  return config, workdir


def default_workdir(config_spec: str, config: Any = None) -> str:
  """runs/<config file stem>[_<arg>][/<overrides>], e.g. runs/digits_vit_sigmoid/train_examples=500.

  Each (config, arg) gets its own directory, so a softmax run never resumes
  from a sigmoid run's checkpoints. A `config` that differs from what
  `config_spec` loads (--config.x=y overrides) goes one level down, in a
  directory named by the differing fields (`configlib.run_dirname`): fields
  that do not change what is trained (`configlib.RUN_NEUTRAL_FIELDS`: log and
  checkpoint cadence, ...) are left out, so a run resumed with another log
  cadence finds its checkpoints, and an override to the file's own value
  names no directory.

  Args:
    config_spec: "path/to/config.py[:arg]", as given to --config.
    config: the config in use; None: the file's own.
  """
  path, _, arg = config_spec.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  suffix = re.sub(r"[^A-Za-z0-9.]+", "_", arg).strip("_")
  workdir = os.path.join("runs", f"{stem}_{suffix}" if suffix else stem)
  if config is None:
    return workdir
  differences = configlib.training_differences(config, configlib.load(config_spec))
  if not differences:
    return workdir
  return os.path.join(workdir, configlib.run_dirname(differences, configlib.flatten(config)))


def run_main(argv: list[str], fn: Callable[[Any, str], None]) -> None:
  """Calls fn(config, workdir); expected failures end with a message, not a traceback."""
  if len(argv) > 1:
    sys.exit(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  config, workdir = config_and_workdir()
  try:
    fn(config, workdir)
  except (configlib.ConfigError, DatasetNotPreparedError, FloatingPointError) as e:
    sys.exit(f"Error: {e}")


def report_training(summary: dict[str, Any]) -> None:
  """Prints the end-of-training summary."""
  print(
      f"\nTest accuracy {summary['eval_accuracy']:.2%} (loss {summary['eval_loss']:.4f}) after "
      f"{summary['step']} steps ({summary['train_seconds']:.0f} s of training).\n"
      f"  checkpoints: {summary['checkpoint_dir']}\n"
      f"  metrics:     {os.path.join(summary['workdir'], 'metrics.jsonl')}\n"
      f"  evaluate:    python eval.py --config <same config> --workdir {summary['workdir']}"
  )
