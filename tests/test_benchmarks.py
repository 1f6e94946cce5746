"""The benchmark scripts still import against the library: a renamed or
removed name they import would otherwise surface only when someone reruns
a benchmark to reproduce a figure of benchmarks/RESULTS.md. Importing runs
no benchmark (every script's work sits under `if __name__ == "__main__"`,
checked here too); their --quick modes take minutes, so the suite does
not run them."""

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


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_a_benchmark_script_imports_and_does_no_work_on_import(path,
                                                               monkeypatch):
  source = path.read_text()
  assert 'if __name__ == "__main__":' in source, path.name
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
