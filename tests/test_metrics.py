"""MetricWriter: metrics.jsonl, resume truncation, and TensorBoard events when tensorboardX is there."""

import glob
import os
import struct

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


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(10, "train", {"loss": 0.5, "accuracy": 0.75})
  writer.write(20, "eval", {"accuracy": 0.875})
  writer.close()
  scalars = read_tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert sorted(scalars) == [("eval/accuracy", 20, 0.875), ("train/accuracy", 10, 0.75),
                             ("train/loss", 10, 0.5)]
