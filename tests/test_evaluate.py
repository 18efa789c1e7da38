"""Unit tests of the attention diagnostics in attnlab.evaluate (end to end: test_train.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from attnlab import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_evaluator_builds_on_the_experiment_not_on_the_training_loop():
  # A fresh interpreter: in this one, other tests may have imported the loop already.
  code = ("import sys, attnlab.evaluate; "
          "print(sorted(m for m in sys.modules if m in ('attnlab.train', 'attnlab.experiment')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "['attnlab.experiment']"


def test_uniform_softmax_rows():
  w = np.full((2, 3, 5, 5), 1 / 5, np.float32)
  stats = evaluate.attention_stats(w, causal=False)
  assert stats["entropy"] == pytest.approx(np.log(5))
  assert stats["row_sum"] == pytest.approx(1.0)
  assert stats["first_token"] == pytest.approx(0.2)
  assert stats["below_1e-3"] == 0.0


def test_sigmoid_rows_are_normalised_for_entropy_but_not_for_row_sum():
  w = np.full((1, 1, 4, 4), 0.5, np.float32)  # every key at sigmoid(0)
  stats = evaluate.attention_stats(w, causal=False)
  assert stats["row_sum"] == pytest.approx(2.0)
  assert stats["entropy"] == pytest.approx(np.log(4))
  assert stats["first_token"] == pytest.approx(0.25)


def test_attention_sink_and_sparsity():
  w = np.zeros((1, 1, 4, 4), np.float32)
  w[..., 0] = 1.0  # every query on the first key
  stats = evaluate.attention_stats(w, causal=False)
  assert stats["first_token"] == pytest.approx(1.0)
  assert stats["entropy"] == pytest.approx(0.0)
  assert stats["below_1e-3"] == pytest.approx(12 / 16)


def test_causal_counts_only_visible_keys():
  # Uniform causal softmax: row i spreads 1 / (i + 1) over keys 0..i; nothing is "small".
  length = 4
  w = np.tril(np.ones((length, length))) / np.arange(1, length + 1)[:, None]
  stats = evaluate.attention_stats(w[None, None].astype(np.float32), causal=True)
  assert stats["below_1e-3"] == 0.0
  assert stats["entropy"] == pytest.approx(np.mean(np.log(np.arange(1, length + 1))))
  assert stats["first_token"] == pytest.approx(np.mean(1 / np.arange(1, length + 1)))
  # Without the causal mask the zeros above the diagonal would count as small weights.
  assert evaluate.attention_stats(w[None, None], causal=False)["below_1e-3"] == pytest.approx(6 / 16)
