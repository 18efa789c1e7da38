"""Flags shared by the thin entry points train.py and eval.py.

`--config path.py[:arg]` loads `get_config(arg)` from an experiment file
(ml_collections config_flags); `--config.a.b=value` overrides a field, and a
field that does not exist is an error that names the nearest valid one. A
field that may hold None takes `--config.a.b=none` (see attnlab.configlib).
Overrides that change what is trained name the default workdir:
`--config.data.train_examples=500` -> runs/digits_vit_sigmoid/train_examples=500.

Expected failures (`EXPECTED_ERRORS`: a bad config or override, a missing
config file, data set or run, a workdir that is a file, not writable or in
use by another run, a checkpoint that cannot be written or restored, a NaN
stop) end with exit status 1 and one line on stderr, `Error: <what,
where, the fix>`, not a traceback. The traceback is still there for
debugging: set the environment variable ATTNLAB_TRACEBACK=1 (or pass
--verbosity=1, which also shows INFO logs). Any other exception is a bug
and prints its traceback as usual.

Several processes (train.py --jax_distributed): `jax.distributed.initialize()`
runs before anything else, auto-detected on Cloud TPU and SLURM, else from
--coordinator_address, --num_processes and --process_id given to every
process (docs/distributed.md). Only process 0 prints the summaries.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
from absl import flags
from absl import logging
from ml_collections import config_flags

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib
from attnlab import workdir as workdir_lib
from attnlab.data import DatasetNotPreparedError

FLAGS = flags.FLAGS
_CONFIG = "config"

# Set (to anything but "" or "0") to see the traceback of an expected failure.
TRACEBACK_ENV = "ATTNLAB_TRACEBACK"

# Failures whose message says what went wrong and how to fix it, so the
# command line prints that message alone. Config values that the typed
# configs reject arrive as ConfigError (attnlab.experiment re-raises the
# ValueErrors of config building as one); a bare ValueError is not listed,
# so one from anywhere else (a bug) keeps its traceback. DatasetNotPreparedError
# is a FileNotFoundError, listed for the reader.
EXPECTED_ERRORS = (
    configlib.ConfigError,
    DatasetNotPreparedError,
    FileNotFoundError,  # a config file, a run or a checkpoint that is not there
    NotADirectoryError,  # a workdir below a file
    PermissionError,  # a workdir that cannot be written
    FloatingPointError,  # the NaN stop, naming the step
    workdir_lib.WorkdirLockedError,  # another live run holds the workdir (named)
    checkpoint_lib.CheckpointError,  # a failed write, a damaged checkpoint (its directory)
)


class DistributedSetupError(RuntimeError):
  """--jax_distributed could not start: flags missing or inconsistent, the coordinator unreachable."""


EXPECTED_ERRORS += (DistributedSetupError,)


def define_flags(*, default_config: str, flag_values: flags.FlagValues = FLAGS,
                 argv: list[str] | None = None, distributed: bool = False) -> None:
  """Defines --config and --workdir (call before app.run).

  Args:
    default_config: config file (and :arg) used without --config, relative to
      the repository root.
    flag_values: where to define them (tests pass their own FlagValues).
    argv: the command line whose --config.x overrides to read (None: sys.argv,
      read when parsed).
    distributed: also define --jax_distributed and its three settings (train.py).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    _define_config_flag(os.path.join(root, default_config), flag_values, argv)
  except (AttributeError, KeyError) as e:  # config_flags applies --config.x overrides here too
    _exit_bad_override(e)
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: "
                      "runs/<config name>[_<arg>][/<overrides that change what is trained>].",
                      flag_values=flag_values)
  if distributed:
    _define_distributed_flags(flag_values)


def _define_config_flag(default: str, flag_values: flags.FlagValues,
                        argv: list[str] | None) -> None:
  """--config: a config file (path.py[:arg]), locked; --config.x=y overrides its fields."""
  config_flags.DEFINE_config_file(_CONFIG, default, "Experiment config: path.py[:arg].",
                                  flag_values=flag_values, lock_config=True,
                                  accept_new_attributes=False, sys_argv=argv)


def _define_distributed_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_bool("jax_distributed", False,
                    "Run as one of several processes (jax.distributed.initialize): auto-detected "
                    "on Cloud TPU and SLURM, else give the three flags below to every process.",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                      "(with --jax_distributed; default: auto-detected).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "How many processes in all (with "
                       "--jax_distributed; default: auto-detected).", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index, 0 ... num_processes - 1 (with "
                       "--jax_distributed; default: auto-detected).", lower_bound=0,
                       flag_values=flag_values)


_DISTRIBUTED_SETTINGS = ("coordinator_address", "num_processes", "process_id")


def initialize_distributed(flag_values: flags.FlagValues = FLAGS) -> None:
  """`jax.distributed.initialize(...)` if --jax_distributed is set (before jax computes anything).

  Raises:
    DistributedSetupError: a setting given without --jax_distributed, or
      jax could not start (no cluster detected and settings missing, the
      coordinator unreachable); the message says which flags to pass.
  """
  if "jax_distributed" not in flag_values:
    return
  given = {name: flag_values[name].value for name in _DISTRIBUTED_SETTINGS
           if flag_values[name].value is not None}
  if not flag_values.jax_distributed:
    if given:
      raise DistributedSetupError(
          f"--{' --'.join(given)} given without --jax_distributed; add --jax_distributed to "
          "run as one of several processes, or drop them.")
    return
  try:
    jax.distributed.initialize(**given)
  except (ValueError, RuntimeError) as e:
    message = " ".join(str(e).split())
    raise DistributedSetupError(
        f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in given.items())}) "
        f"failed: {message}. Outside Cloud TPU and SLURM pass --coordinator_address=<host of "
        "process 0>:<free port> --num_processes=N --process_id=<0..N-1> to every process "
        "(docs/distributed.md).") from e


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
  except OSError:
    # A --config.x override applied to a config file that failed to load;
    # the flag is not parsed yet, so its file is read off the command line.
    spec = _config_spec(argv)
    if spec is None or os.path.isfile(spec.partition(":")[0]) or traceback_wanted():
      raise
    sys.exit(error_line(_missing_config_file(spec)))


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config (last one wins, as in absl) on `argv`, or None."""
  spec = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{_CONFIG}="):
      spec = arg.partition("=")[2]
    elif arg == f"--{_CONFIG}" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _exit_bad_override(e: BaseException) -> None:
  message = str(e.args[0] if e.args else e)
  message = message.strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
  sys.exit(f"Error: unknown config field in a --config.<field>=<value> override: {message}")


def config_and_workdir(flag_values: flags.FlagValues = FLAGS) -> tuple[Any, str]:
  """The parsed config and the workdir (default: `default_workdir`).

  Raises:
    FileNotFoundError: the --config file does not exist.
    NotADirectoryError: --workdir names a file.
  """
  _check_config_file(flag_values[_CONFIG].config_filename)
  config = flag_values[_CONFIG].value
  workdir = flag_values.workdir
  if workdir is None:
    workdir = default_workdir(flag_values[_CONFIG].config_filename, config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory; pass a directory "
                             "(or a path that does not exist yet) as --workdir.")
  return config, workdir


def _check_config_file(config_spec: str) -> None:
  # config_flags keeps a load failure until the config is first read, then
  # raises it as two chained OSErrors with the cause last; say it first.
  if not os.path.isfile(config_spec.partition(":")[0]):
    raise _missing_config_file(config_spec)


def _missing_config_file(config_spec: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"No config file {config_spec.partition(':')[0]!r} (--config {config_spec}, relative to "
      f"{os.getcwd()}); the experiments are in configs/, e.g. --config "
      "configs/digits_vit.py:sigmoid.")


def default_workdir(config_spec: str, config: Any = None) -> str:
  """runs/<config file stem>[_<arg>][/<overrides>], e.g. runs/digits_vit_sigmoid/train_examples=500.

  A config in a folder below configs/ is prefixed with the folder's name:
  configs/sample_efficiency/digits.py:quick -> runs/sample_efficiency_digits_quick.

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
  parent = os.path.basename(os.path.dirname(os.path.normpath(path)))
  if parent not in ("", ".", "configs"):
    # configs/sample_efficiency/digits.py -> runs/sample_efficiency_digits
    stem = f"{parent}_{stem}"
  suffix = re.sub(r"[^A-Za-z0-9.]+", "_", arg).strip("_")
  workdir = os.path.join("runs", f"{stem}_{suffix}" if suffix else stem)
  if config is None:
    return workdir
  differences = configlib.training_differences(config, configlib.load(config_spec))
  if not differences:
    return workdir
  return os.path.join(workdir, configlib.run_dirname(differences, configlib.flatten(config)))


def run_main(argv: list[str], fn: Callable[[Any, str], None],
             flag_values: flags.FlagValues = FLAGS) -> None:
  """Calls fn(config, workdir); an expected failure exits with one `Error:` line.

  Args:
    argv: what absl's app.run passes (the program name, then unparsed words).
    fn: the entry point's work, e.g. training then printing the summary.
    flag_values: where --config and --workdir were defined.

  Raises:
    SystemExit(1): an `EXPECTED_ERRORS` failure, its message on one line
      (unless a traceback is asked for: see `traceback_wanted`).
    SystemExit(130): Ctrl-C outside the training loop, after one line.
  """
  if len(argv) > 1:
    sys.exit(f"Error: unexpected arguments {argv[1:]}; flags take the form --name=value.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  try:
    initialize_distributed(flag_values)
    fn(*config_and_workdir(flag_values))
  except EXPECTED_ERRORS as e:
    if traceback_wanted():
      raise
    sys.exit(error_line(e))
  except KeyboardInterrupt:
    # The training loop saves and exits 130 on Ctrl-C itself; this is Ctrl-C during set-up or
    # the final evaluation, where there is nothing new to save.
    if traceback_wanted():
      raise
    print("Interrupted (Ctrl-C) outside the training loop; checkpoints already written are "
          "kept.", file=sys.stderr)
    sys.exit(130)


def traceback_wanted() -> bool:
  """Whether an expected failure shows its traceback: $ATTNLAB_TRACEBACK set, or --verbosity>=1."""
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  # absl defines --verbosity (on the global FLAGS) for every program.
  return bool(FLAGS["verbosity"].present) and FLAGS["verbosity"].value >= 1


def error_line(error: BaseException) -> str:
  """`Error: <message>` on one line, with how to see the traceback."""
  message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return f"Error: {message or type(error).__name__} ({TRACEBACK_ENV}=1 shows the traceback)"


def report_training(summary: dict[str, Any]) -> None:
  """Prints the end-of-training summary (for a run that had already finished, nothing more).

  `train_and_evaluate` has said in one line that such a run is finished;
  repeating its old summary would read as if it had trained again. Only
  process 0 of several prints.
  """
  if summary.get("already_finished") or jax.process_index() != 0:
    return
  print(
      f"\nTest accuracy {summary['eval_accuracy']:.2%} (loss {summary['eval_loss']:.4f}) after "
      f"{summary['step']} steps ({summary['train_seconds']:.0f} s of training).\n"
      f"  checkpoints: {summary['checkpoint_dir']}\n"
      f"  metrics:     {os.path.join(summary['workdir'], 'metrics.jsonl')}\n"
      f"  evaluate:    python eval.py --config <same config> --workdir {summary['workdir']}"
  )


def report_study(summary: dict[str, Any]) -> None:
  """Prints a study's summary: its report's table, the plot's path and the samples ratio.

  Only process 0 of several prints (it alone wrote the report).
  """
  if jax.process_index() != 0:
    return
  paths = summary["paths"]
  with open(paths["report"], encoding="utf-8") as f:
    print("\n" + f.read().rstrip())
  if summary.get("missing_cells"):
    print(f"\nNot yet trained ({len(summary['missing_cells'])} cells): the report covers the "
          "others; rerun train.py to finish the study.")
  print(f"\n  report: {paths['report']}\n  plot:   {paths['error_plot']}\n"
        f"  cells:  {paths['json']}")
  if "seconds" in summary:
    print(f"  {summary['trained_cells']} cells trained, {summary['skipped_cells']} already "
          f"recorded, in {summary['seconds']:.0f} s.")
