"""benchmarks/tune_mgpu.py: the winner of each shape class on constructed timings, the table
it merges, and a quick CPU run (interpret mode) end to end."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import tune_mgpu  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from attnlab.kernels import flash_mgpu  # noqa: E402
from attnlab.kernels import tuned  # noqa: E402


def _row(impl, length, ms=None, error=None, **options):
  row = {"kind": "sigmoid", "head_dim": 128, "causal": True, "length": length, "impl": impl,
         "options": {"backend": "gpu" if impl == "gpu" else "mgpu", **options}}
  row.update({"ms": ms} if error is None else {"error": error})
  return row


def test_winner_is_the_lowest_median_over_lengths_among_complete_candidates():
  rows = [_row("gpu", 4096, 10.0), _row("gpu", 16384, 100.0),
          _row("mgpu k128 s2", 4096, 8.0, block_k=128, num_stages=2),
          _row("mgpu k128 s2", 16384, 90.0, block_k=128, num_stages=2),
          # Fastest at one length, but it failed at the other: never a winner.
          _row("mgpu k64 s4", 4096, 1.0, block_k=64, num_stages=4),
          _row("mgpu k64 s4", 16384, error="ValueError: shared memory"),
          _row("mgpu k64 s2", 4096, 9.0, block_k=64, num_stages=2),
          _row("mgpu k64 s2", 16384, 95.0, block_k=64, num_stages=2)]
  assert tune_mgpu.winner(rows) == {"backend": "mgpu", "block_k": 128, "num_stages": 2,
                                    "ms": 49.0, "triton_ms": 55.0, "lengths": [4096, 16384]}
  slower = [dict(r, ms=r["ms"] * 10) if r["impl"] != "gpu" and "ms" in r else r for r in rows]
  assert tune_mgpu.winner(slower)["backend"] == "gpu"
  assert tune_mgpu.winner([r for r in rows if r["impl"] != "gpu"]) is None  # no baseline


def test_merge_keeps_other_devices(tmp_path):
  path = tmp_path / "table.json"
  path.write_text(json.dumps({"devices": {"NVIDIA H200": {"a": {"backend": "gpu"}}}}))
  tune_mgpu.merge_table(path, "NVIDIA H100 80GB HBM3", {"b": {"backend": "mgpu"}})
  table = tuned.load_table.__wrapped__(str(path))
  assert table["devices"] == {"NVIDIA H200": {"a": {"backend": "gpu"}},
                              "NVIDIA H100 80GB HBM3": {"b": {"backend": "mgpu"}}}


@pytest.mark.slow
@pytest.mark.skipif(flash_mgpu.interpret_params() is None,
                    reason="this jax has no complete Mosaic GPU interpret mode (jax >= 0.12.1)")
def test_quick_run_measures_every_candidate(tmp_path):
  args = tune_mgpu.parse_args(["--quick", "--kinds", "sigmoid", "--out", str(tmp_path / "t.md"),
                               "--out-table", str(tmp_path / "table.json")])
  entries = tune_mgpu.run(args)
  assert list(entries) == ["sigmoid/bfloat16/d64/causal"]
  assert entries["sigmoid/bfloat16/d64/causal"]["backend"] in ("gpu", "mgpu")
  lines = (tmp_path / "t.md").read_text().splitlines()
  measured = [line for line in lines if line.startswith("| sigmoid |")]
  assert len(measured) == 3 and all("error" not in line for line in measured), measured
  table = json.loads((tmp_path / "table.json").read_text())
  assert list(table["devices"].values()) == [entries]
