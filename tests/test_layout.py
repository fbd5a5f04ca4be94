"""The layout rules the codebase keeps, checked on its source: no private name of one module used
by another, the run directory's file names spelled only in the module that owns them, commands
alone (and short) at the top of the package, and every function-local import saying why."""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "finercut_jax"
# Where the rules apply: the library and the benchmarks (tests may test the privates of the module
# they test).
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])

# Every file name of a run or comparison directory; only rundir/layout.py spells them. A Hugging
# Face checkpoint has a config.json too: the model package, which reads and writes that format,
# may name it.
RUN_FILES = ("config.json", "calibration_tokens.npy", "search_state.json", "ranking.json",
             "masks.json", "eval_results.json", "report.md", "layer_map.png",
             "score_per_step.png", "metrics_vs_ratio.png", "healing.json", "healing.png",
             "comparison_state.json", "dense_eval.json", "comparison.json", "comparison.md",
             "accuracy_vs_ratio.png", "perplexity_vs_ratio.png", "layer_maps.png", ".lock")
RUN_FILES_OWNER = PACKAGE / "rundir" / "layout.py"
ALSO_ALLOWED = {"config.json": PACKAGE / "model"}


def _where(path: pathlib.Path, line: int) -> str:
  return f"{os.path.relpath(path, REPO)}:{line}"


def _project_module(name: str) -> bool:
  return name.split(".")[0] in ("finercut_jax", "benchmarks")


def _docstrings(tree: ast.AST) -> set[int]:
  """ids of the string constants that are docstrings."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        out.add(id(body[0].value))
  return out


def _private_uses(path: pathlib.Path) -> list[str]:
  """`from project.module import _name`, and `module._name` where `module` is a project module
  this file imported."""
  tree = ast.parse(path.read_text(), str(path))
  modules = set()  # local names bound to project modules
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and _project_module(node.module):
      for alias in node.names:
        if alias.name.startswith("_"):
          found.append(f"{_where(path, node.lineno)}: imports {node.module}.{alias.name}")
        full = f"{node.module}.{alias.name}"
        if (REPO / (full.replace(".", "/") + ".py")).exists() or (
            REPO / full.replace(".", "/") / "__init__.py").exists():
          modules.add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if _project_module(alias.name):
          modules.add(alias.asname or alias.name.split(".")[0])
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      root = node.value
      while isinstance(root, ast.Attribute):
        root = root.value
      if isinstance(root, ast.Name) and root.id in modules:
        found.append(f"{_where(path, node.lineno)}: uses {ast.unparse(node)}")
  return found


def test_no_private_name_is_used_outside_its_module():
  found = [line for path in SOURCES for line in _private_uses(path)]
  assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_check_finds_a_private_use(tmp_path):
  """The check above can fail: a module that imports another's private name is caught."""
  bad = tmp_path / "probe.py"
  bad.write_text("from finercut_jax.rundir import atomic\n"
                 "from finercut_jax.rundir.layout import _Directory\n"
                 "atomic._hidden()\n")
  assert len(_private_uses(bad)) == 2


def _run_file_names(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text(), str(path))
  docstrings = _docstrings(tree)
  found = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings):
      for name in RUN_FILES:
        allowed = ALSO_ALLOWED.get(name)
        if name in node.value and not (allowed and allowed in path.parents):
          found.append(f"{_where(path, node.lineno)}: {node.value!r}")
  return found


def test_run_directory_file_names_are_spelled_in_one_module():
  found = [line for path in PACKAGE.rglob("*.py") if path != RUN_FILES_OWNER
           for line in _run_file_names(path)]
  assert not found, ("run-directory file names outside finercut_jax/rundir/layout.py (use "
                     "rundir.RunDir / ComparisonDir):\n" + "\n".join(found))
  assert _run_file_names(RUN_FILES_OWNER), "the owner spells them: the check looks for them"


def test_the_top_of_the_package_holds_only_short_commands():
  """finercut_jax/*.py are the five commands (each parses its flags, calls one library function
  and maps errors); the library lives in the subpackages."""
  for path in PACKAGE.glob("*.py"):
    if path.name == "__init__.py":
      continue
    text = path.read_text()
    assert 'if __name__ == "__main__":' in text, f"{path.name} is not a command"
    assert len(text.splitlines()) <= 60, f"{path.name} is longer than a command should be"


def test_function_local_imports_say_why():
  """Imports sit at module level; one inside a function (an optional or heavy dependency, or a
  cycle it breaks) follows a `# lazy: <why>` comment in that function."""
  found = []
  for path in SOURCES:
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines), str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if (isinstance(inner, (ast.Import, ast.ImportFrom))
              and not any("# lazy:" in line for line in lines[node.lineno - 1:inner.lineno])):
            found.append(f"{_where(path, inner.lineno)}: {lines[inner.lineno - 1].strip()}")
  assert not found, "function-local imports without a reason:\n" + "\n".join(found)


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir()
                                           if (p / "__init__.py").exists()))
def test_each_subpackage_lists_its_public_names(package):
  init = PACKAGE / package / "__init__.py"
  tree = ast.parse(init.read_text())
  assert ast.get_docstring(tree), f"{package}/__init__.py says what the subpackage is for"
  names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
           if isinstance(t, ast.Name)]
  assert "__all__" in names, f"{package}/__init__.py lists its public names in __all__"
