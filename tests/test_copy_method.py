"""A method file plus common.py is the whole method: copied alone into an empty folder, each
imports and runs the README's "Use a method in your own code" example (on the tiny backbone)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_example(method):
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- copy-example: {method} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README has no copy example for {method}"
    return match.group(1)


def run_alone(folder, *argv):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *argv], cwd=folder, capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("method", ["biomedap", "biomedvr"])
def test_a_copied_method_imports_and_runs_the_readme_example(method, tmp_path):
    for name in (f"{method}.py", "common.py"):
        shutil.copy(REPO / name, tmp_path / name)
    example = readme_example(method)
    assert example.count('load_backbone("biomedclip")') == 1, "the example names its backbone in one place"
    (tmp_path / "example.py").write_text(example.replace('load_backbone("biomedclip")', 'load_backbone("tiny")'))
    imported = run_alone(tmp_path, "-c", f"import sys, {method}; print(sorted(m for m in ('runner', 'data') "
                                          "if m in sys.modules))")
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stderr
    out = run_alone(tmp_path, "example.py")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len([line for line in lines if re.match(r"^\d+ \{'loss': ", line)]) == 3  # one line an epoch
    assert re.fullmatch(r"accuracy \d+\.\d%", lines[-1])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == sorted(
        ["common.py", "example.py", f"{method}.py"])
