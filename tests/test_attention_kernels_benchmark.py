"""benchmarks/attention_kernels.py as a library (notebook 03 imports it): the table as data,
the bar chart, the kernels' distance from the jnp reference. CPU: interpret mode, tiny shapes."""

import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import attention_kernels  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


@pytest.mark.slow
def test_run_returns_the_rows_it_prints_and_writes(tmp_path):
  args = attention_kernels.parse_args(["--quick", "--lengths", "64", "--masks", "causal",
                                       "--repeats", "1", "--out", str(tmp_path / "table.md"),
                                       "--plot", str(tmp_path / "chart.png")])
  rows = attention_kernels.run(args)
  impls = attention_kernels.implementations(True, args.xla_max_len, 64, False)
  assert {"flash-sigmoid mgpu", "flash-softmax mgpu"} <= set(impls)
  names = list(impls)
  assert [r["impl"] for r in rows] == names
  # A row is skipped only for the reason implementations() gives (jax 0.12.1 no longer ships
  # the Triton softmax op); every implementation that exists runs on CPU.
  skipped = {name: reason for name, reason in impls.items() if isinstance(reason, str)}
  assert set(skipped) <= {"jax pallas softmax", "jax mgpu softmax", "flash-sigmoid mgpu",
                          "flash-softmax mgpu"}, skipped
  assert {r["impl"]: r["note"] for r in rows if "note" in r} == skipped
  measured = [r for r in rows if "note" not in r]
  assert all((r["length"], r["head_dim"], r["mask"]) == (64, 64, "causal") for r in rows)
  flops = attention_kernels.attention_flops(256 // 64, 128 // 64, 64, 64, 64, True)
  for r in measured:
    assert r["fwd_tflops"] == pytest.approx(flops / (r["fwd_ms"] * 1e-3) / 1e12)
    assert r["fwdbwd_tflops"] == pytest.approx(3.5 * flops / (r["fwdbwd_ms"] * 1e-3) / 1e12)
  ref = next(r for r in measured if r["impl"] == attention_kernels.REFERENCE)
  assert ref["fwd_x"] == ref["fwdbwd_x"] == 1.0
  table = (tmp_path / "table.md").read_text().splitlines()
  assert [attention_kernels.format_row(r) for r in rows] == [
      line for line in table if line.startswith("|     64 |")]
  assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_tflops_one_bar_per_chart_impl_and_shape():
  measured = lambda impl, length, mask: dict(length=length, head_dim=64, mask=mask, impl=impl,
                                             fwd_tflops=1.0, fwdbwd_tflops=2.0)
  rows = [measured(impl, length, mask) for length in (128, 256) for mask in ("causal", "full")
          for impl in ("flash-sigmoid (ours)", "flash-softmax (ours)", "softmax xla (attend)")]
  rows.append(dict(length=512, head_dim=64, mask="full", impl="flash-sigmoid (ours)",
                   note="error: OOM"))
  fig = attention_kernels.plot_tflops(rows, title="t")
  fwd, fwdbwd = fig.axes[:2]
  # "softmax xla (attend)" is not a chart impl and the row with a note was not measured.
  assert len(fwd.patches) == len(fwdbwd.patches) == 2 * 4
  assert [t.get_text() for t in fwd.get_xticklabels()] == [
      "L=128\ncausal", "L=128\nfull", "L=256\ncausal", "L=256\nfull"]
  assert {p.get_height() for p in fwdbwd.patches} == {2.0}


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_reference_errors_of_the_kernel_are_float32_rounding(kind):
  errors = attention_kernels.reference_errors(kind, length=40, head_dim=16)
  assert sorted(errors) == ["dk", "dq", "dv", "out"]
  assert all(math.isfinite(e) and e < 1e-5 for e in errors.values()), errors
