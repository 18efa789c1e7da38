"""attnlab's layers, bottom to top, and the imports between them (read with `ast`, no import).

A module may import from its own layer's packages and from lower layers, never from a higher
one, and never inside a function (an import hidden there is how a cycle hides). An import
that has to break the order for a while is listed in `KNOWN_BREAKS` with what would fix it
(none today); the test fails on any new break and on a listed one that has gone (so the
list only shrinks).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "attnlab"

# Bottom to top. Each entry is one layer: the top-level modules and packages of attnlab in it.
LAYERS = (
    ("fileio", "configlib", "metrics", "optim", "stats", "sigmoid_bias", "axes"),
    ("checks", "checkpoint"),
    ("workdir", "sharding"),  # sharding below the models: it reads their axes from `axes`
    ("kernels",),
    ("attention",),
    ("models",),
    ("data",),
    ("model_fns", "experiment"),
    ("placement",),
    ("train", "evaluate", "cli"),
    ("studies", "moe"),
)
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}

# (importing module, imported module, why it is still there / what would remove it).
KNOWN_BREAKS: dict[tuple[str, str], str] = {}


def _module_name(path: pathlib.Path) -> str:
  parts = ("attnlab",) + path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """(imported attnlab module, inside a function?) for every attnlab import in the file."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  in_function = {id(n) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnlab"):
      for alias in node.names:
        yield (f"attnlab.{alias.name}" if node.module == "attnlab" else node.module,
               id(node) in in_function)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("attnlab"):
          yield alias.name, id(node) in in_function


def _top(module: str) -> str:
  return module.split(".")[1] if module.count(".") else ""


def _breaks():
  found = {}
  for path in sorted(ROOT.rglob("*.py")):
    importer = _module_name(path)
    for imported, local in _imports(path):
      a, b = _top(importer), _top(imported)
      if not a or not b or a == b:
        continue
      upward = LEVEL[b] > LEVEL[a]
      if upward or local:
        found[(importer, imported)] = ("upward" if upward else "",
                                       "in a function" if local else "")
  return found


def test_every_top_level_module_has_a_layer():
  names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
  assert names == set(LEVEL), (sorted(names - set(LEVEL)), sorted(set(LEVEL) - names))


def test_imports_follow_the_layers_but_for_the_known_breaks():
  found = _breaks()
  new = {k: v for k, v in found.items() if k not in KNOWN_BREAKS}
  assert not new, f"imports that break the layer order (see LAYERS): {new}"
  gone = set(KNOWN_BREAKS) - set(found)
  assert not gone, f"fixed, so remove from KNOWN_BREAKS: {sorted(gone)}"


def test_the_checker_sees_an_upward_and_a_hidden_import(tmp_path, monkeypatch):
  """The test above can fail: a fake tree with one upward and one function-local import."""
  pkg = tmp_path / "attnlab"
  (pkg / "kernels").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "kernels" / "__init__.py").write_text("from attnlab import studies\n")
  (pkg / "data.py").write_text("def f():\n  from attnlab import configlib\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
  assert _breaks() == {("attnlab.kernels", "attnlab.studies"): ("upward", ""),
                       ("attnlab.data", "attnlab.configlib"): ("", "in a function")}
