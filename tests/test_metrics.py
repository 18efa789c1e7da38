"""MetricWriter: metrics.jsonl, resume truncation, and TensorBoard events when tensorboardX is there."""

import glob
import io
import os
import struct
import sys

import numpy as np
from tensorboardX.proto import event_pb2  # the 'test' extra installs tensorboardX

from attnlab import metrics


def read_tensorboard_scalars(logdir):
  """(tag, step, value) of every scalar in the event files (TFRecord framing, no TensorFlow)."""
  scalars = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]  # skip the length's crc
      offset += 12 + length + 4  # and the record's crc
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


def test_jsonl_records_and_resume_truncation(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.close()
  # A run resumed from the checkpoint of step 2 drops what step 3 wrote.
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, "train", {"loss": 0.25})
  writer.close()
  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_curve_reads_one_split_and_name_in_step_order(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as writer:
    writer.write(4, "train", {"loss": 0.5, "accuracy": 0.7})
    writer.write(4, "eval", {"eval_loss": 0.6})
    writer.write(2, "train", {"loss": 1.0})  # no accuracy: left out of that curve
  steps, values = metrics.curve(str(tmp_path), "loss")
  assert steps.dtype == np.int64 and values.dtype == np.float64
  assert steps.tolist() == [2, 4] and values.tolist() == [1.0, 0.5]
  assert [a.tolist() for a in metrics.curve(str(tmp_path), "accuracy")] == [[4], [0.7]]
  assert [a.tolist() for a in metrics.curve(str(tmp_path), "eval_loss", split="eval")] == [[4], [0.6]]
  assert [a.tolist() for a in metrics.curve(str(tmp_path), "loss", split="eval")] == [[], []]

def test_tensorboard_events_hold_the_same_scalars(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(10, "train", {"loss": 0.5, "accuracy": 0.75})
  writer.write(20, "eval", {"accuracy": 0.875})
  writer.close()
  scalars = read_tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert sorted(scalars) == [("eval/accuracy", 20, 0.875), ("train/accuracy", 10, 0.75),
                             ("train/loss", 10, 0.5)]


class _Terminal(io.StringIO):
  """A stream that says it is a terminal, to see what a user's terminal would get."""

  def isatty(self):
    return True

  def fileno(self):
    raise OSError("no real terminal")  # so the bar falls back to a fixed width


def test_progress_bar_on_a_terminal_shows_steps_and_loss(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  progress = metrics.Progress(total=40, initial=0, enabled=True, log_every=10)
  for step in range(1, 41):
    progress.update(step, {"loss": 2.0 / step})
  progress.close()
  drawn = terminal.getvalue()
  assert "40/40" in drawn and "loss=0.05" in drawn, drawn[-300:]


def test_progress_without_a_terminal_logs_lines_with_eta(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stream)
  progress = metrics.Progress(total=20, initial=0, enabled=True, log_every=10)
  for step in range(1, 21):
    progress.update(step, {"loss": 1.0})
  progress.close()
  lines = stream.getvalue().splitlines()
  assert [line.split()[1] for line in lines] == ["10/20", "20/20"]
  assert all("ETA" in line for line in lines)


def test_progress_rate_and_eta_count_only_work_done_after_a_resume(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stream)
  clock = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  progress = metrics.Progress(total=100, initial=0, enabled=True, log_every=10)
  progress.skip_to(50)  # a checkpoint restored at 50: no work of this run
  clock[0] = 10.0
  progress.update(60, {})  # 10 steps in 10 seconds
  progress.close()
  (line,) = stream.getvalue().splitlines()
  assert line.split()[1] == "60/100"
  assert "(1.0 steps/s, ETA 40s)" in line, line


def test_progress_bar_skip_keeps_the_jump_out_of_the_rate(monkeypatch):
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  progress = metrics.Progress(total=100, initial=0, enabled=True, log_every=10)
  progress.skip_to(50)
  progress.update(60, {})
  assert progress._bar.n == 60 and progress._bar.initial == 50  # pylint: disable=protected-access
  progress.close()
  assert "60/100" in terminal.getvalue()
