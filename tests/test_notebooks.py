"""The Colab notebooks (colab/*.ipynb): each runs top to bottom in a fresh kernel, headless, on
CPU in quick mode, and each is committed clean (no outputs, no execution counts) and keeps the
notebook rules (issue 13): it opens with what it shows, names its install source in one
variable of its first code cell, has one papermill-style "parameters" cell setting QUICK, and
calls no private name.

Parameters are injected as papermill does: a cell tagged "injected-parameters" right after
the "parameters" cell, which sets QUICK (and WORKDIR, where the notebook has one, to a
temporary directory). The kernel's working directory is the repository root.
"""

import ast
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
IDS = [path.name for path in NOTEBOOKS]
CLEAR_ADVICE = ("clear them before committing (Jupyter: Edit > Clear All Outputs, then save; or "
                "`jupyter nbconvert --clear-output --inplace colab/*.ipynb`)")


def _parameters_cell(nb: nbformat.NotebookNode) -> int:
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found cells {tagged}"
  return tagged[0]


def _assigned(source: str) -> set[str]:
  """Names a cell assigns at its top level."""
  return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
          for target in node.targets if isinstance(target, ast.Name)}


def test_colab_holds_notebooks():
  assert NOTEBOOKS, "no notebook in colab/: the tests below would pass on nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_clean(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and (
      cell.outputs or cell.execution_count is not None or "execution" in cell.metadata)]
  assert not dirty, (f"{path.name}: cells {dirty} hold outputs, execution counts or timings; "
                     + CLEAR_ADVICE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_keeps_the_rules(path):
  nb = nbformat.read(path, as_version=4)
  assert nb.cells[0].cell_type == "markdown", "a notebook opens with what it shows"
  code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
  assert "ATTNLAB_SOURCE" in _assigned(code[0]), "the first code cell names the install source"
  assert "QUICK" in _assigned(nb.cells[_parameters_cell(nb)].source)
  private = sorted({name for source in code for name in re.findall(r"\.(_[A-Za-z]\w*)", source)})
  assert not private, f"{path.name} uses private names {private}: give the package a public one"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_headless_on_cpu_in_quick_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits this process's environment
  monkeypatch.setenv("JAX_NUMPY_RANK_PROMOTION", "raise")  # as tests/conftest.py sets
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # digits is prepared there
  nb = nbformat.read(path, as_version=4)
  at = _parameters_cell(nb)
  overrides = {"QUICK": True, "WORKDIR": str(tmp_path / "runs")}
  names = _assigned(nb.cells[at].source)
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      "\n".join(f"{name} = {value!r}" for name, value in overrides.items() if name in names),
      metadata={"tags": ["injected-parameters"]}))
  # Raises CellExecutionError, with the cell and its traceback, on the first failing cell.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO)}}).execute()
