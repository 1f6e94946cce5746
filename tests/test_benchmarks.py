"""The benchmark scripts still fit the library: a renamed or removed name
they import would otherwise surface only when someone reruns a benchmark
to reproduce a figure of benchmarks/RESULTS.md. Each script is imported
(its work sits under `if __name__ == "__main__"`), and every import of
the library it makes, at the top or inside a function (several import
the library only after setting XLA flags), is resolved. Their --quick
modes take minutes, so the suite does not run them."""

import ast
import importlib
import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "_bench.py")
# Optional heavy dependencies of the comparison rows (the "bench" extra).
OPTIONAL = {"torch", "opacus"}


def test_the_benchmark_folder_is_found():
  assert len(SCRIPTS) >= 20, SCRIPTS


def library_imports(source: str) -> list[tuple[str, str | None]]:
  """(module, name) for every `from dpgeng_jax... import name` and
  (module, None) for every `import dpgeng_jax...`, nested ones too."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(
        ".")[0] == "dpgeng_jax" and node.level == 0:
      found += [(node.module, a.name) for a in node.names]
    elif isinstance(node, ast.Import):
      found += [(a.name, None) for a in node.names
                if a.name.split(".")[0] == "dpgeng_jax"]
  return found


def test_the_import_scan_sees_nested_imports_and_missing_names():
  source = ("def f():\n  from dpgeng_jax.pergrad import nothing_here\n"
            "  import dpgeng_jax.winograd\n")
  assert library_imports(source) == [("dpgeng_jax.pergrad", "nothing_here"),
                                     ("dpgeng_jax.winograd", None)]
  module = importlib.import_module("dpgeng_jax.pergrad")
  assert not hasattr(module, "nothing_here")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_a_benchmark_script_imports_and_its_library_names_exist(
    path, monkeypatch):
  source = path.read_text()
  assert 'if __name__ == "__main__":' in source, path.name
  for module_name, name in library_imports(source):
    module = importlib.import_module(module_name)
    if name is not None and not hasattr(module, name):
      importlib.import_module(f"{module_name}.{name}")  # a submodule
  monkeypatch.syspath_prepend(str(BENCH))
  spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ModuleNotFoundError as e:
    if e.name in OPTIONAL:
      pytest.skip(f"{path.name} needs {e.name} (the bench extra)")
    raise
  finally:
    sys.modules.pop(spec.name, None)
