"""Files written whole or not at all.

The bottom of the house: `checkpoint` (its digest manifest), `workdir` (config
and finished records) and the study reports all write through `write_atomic`,
so a reader never sees half a file and a killed writer leaves the old one.
"""

from __future__ import annotations

import io
import os
from typing import Any


def write_atomic(path: str, data: str | bytes, *, fsync: bool = False) -> None:
  """Writes `data` to `path` through a temporary file, so a reader sees all of it or none.

  Text is written as UTF-8 exactly as given (no newline translation: a CSV's
  "\\r\\n" stays). fsync=True also flushes the file to disk before it replaces
  the old one, for records that must survive a power loss (a checkpoint's
  manifest), not only a killed process.
  """
  tmp = f"{path}.tmp-{os.getpid()}"
  binary = isinstance(data, bytes)
  with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
    f.write(data)
    if fsync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def write_png(path: str, figure: Any, *, dpi: int) -> None:
  """Saves a matplotlib `figure` as PNG through `write_atomic` (a killed re-render leaves the old plot)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi)
  write_atomic(path, buffer.getvalue())
