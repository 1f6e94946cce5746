"""The README's examples run, and CI runs the README's test command."""

import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
  blocks = _python_blocks()
  assert len(blocks) >= 2
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
  assert (tmp_path / "runs" / "from_python" / "privacy.json").exists()


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  assert 'pip install ".[test]" && python -m pytest -q -n 2' in readme
  assert 'pip install --quiet ".[test]"' in ci
  assert "python -m pytest -q -n 2" in ci
  assert os.access(ROOT / ".ci" / "run", os.X_OK)
