"""What a run directory holds about its run, and who may use it.

A workdir belongs to one run: its config.json says which config trained the
checkpoints next to it. `check_same_run` refuses a config that would train
something else from those checkpoints; `train.py` and `eval.py` both ask it.
"""

from __future__ import annotations

import json
import os

import ml_collections

from attnlab import checkpoint as checkpoint_lib
from attnlab import configlib

CONFIG_FILE = "config.json"


def check_same_run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose checkpoints were trained under another config.

  Fields that only change how a run is watched or stored
  (`configlib.RUN_NEUTRAL_FIELDS`: log and checkpoint cadence, ...) may differ.
  A workdir without config.json or without a finished checkpoint passes:
  there is nothing to resume.

  Args:
    config: the config about to train or evaluate in `workdir`.
    workdir: the run directory (not created here).

  Raises:
    configlib.ConfigError: the saved config differs in fields that change what
      is trained; the message names them, both values, and the fix.
  """
  saved = _saved_config(workdir)
  if saved is None or not checkpoint_lib.Checkpointer.exists(workdir):
    return
  current = _flat_json(config)
  differ = sorted(k for k in saved.keys() | current.keys()
                  if saved.get(k) != current.get(k) and k not in configlib.RUN_NEUTRAL_FIELDS)
  if differ:
    raise configlib.ConfigError(
        f"{workdir} holds checkpoints of a run with another config (fields {differ} differ: "
        f"{[(saved.get(k), current.get(k)) for k in differ]}). Use a new --workdir, or the "
        "run's own config to resume it."
    )


def _saved_config(workdir: str) -> dict | None:
  """<workdir>/config.json flattened by dotted path; None if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return configlib.flatten(json.load(f))


def _flat_json(config: ml_collections.ConfigDict) -> dict:
  # Through JSON, as config.json was written, so that tuples and lists compare equal.
  return configlib.flatten(json.loads(config.to_json_best_effort()))
