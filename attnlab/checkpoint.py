"""Orbax checkpoints of the train state and the data iterator (nanodo style).

A checkpoint at step s holds two items: "state" (the `TrainState` pytree:
step, params, optimizer state, rng) and "data" (the data iterator's JSON
state), so a resumed run continues with the very batch it would have seen.
Restoring takes an abstract target (`jax.eval_shape` of the current model and
optimizer, with the current shardings), so a checkpoint written on another
machine or device count loads onto this one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves every `every_steps` steps (and on request), keeps the last `keep`."""

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int | None = None):
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"),
    )

  @staticmethod
  def exists(workdir: str) -> bool:
    """Whether `workdir` holds at least one finished checkpoint (without creating anything)."""
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0

  def reached_preemption(self, step: int) -> bool:
    """Whether every host of a preempted multi-host run has reached its save step.

    Orbax's view of JAX's preemption sync point: after a preemption notice
    reaches any host, this turns True at the same step on every host, so all
    of them save that step. Always False in a single process. Call it at every
    step (the sync protocol counts on it).
    """
    try:
      return bool(self._manager.reached_preemption(step))
    except RuntimeError:
      # The preemption service is off (jax_enable_preemption_service=False):
      # no sync point. Orbax >= 0.12 returns False itself; 0.11 lets JAX's
      # error through.
      return False

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None) -> None:
    """Writes a checkpoint of `state` at `step` (asynchronously: call `wait`)."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
        ),
        force=True,
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """Restores (state, data_state, step) from `step` or the latest checkpoint.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct (with `.sharding` where
        placement matters) describing the state to restore into.
      step: a saved step; None: the latest.

    Raises:
      FileNotFoundError: no checkpoint (at that step).
    """
    steps = self.all_steps()
    if step is None:
      step = self.latest_step()
    if step is None or step not in steps:
      raise FileNotFoundError(
          f"No checkpoint{'' if step is None else f' at step {step}'} in "
          f"{self._manager.directory}; saved steps: {sorted(steps) or 'none'}."
      )
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], dict(restored["data"] or {}), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def with_shardings(abstract: Any, shardings: Any = None) -> Any:
  """`abstract` (ShapeDtypeStructs) with `shardings`, default: all on the first local device.

  Orbax restores each array onto the sharding of its target, so this is what
  makes a checkpoint from another topology load here.
  """
  if shardings is None:
    device = jax.local_devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
