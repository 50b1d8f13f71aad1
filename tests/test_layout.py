"""The layout readers rely on: a small common.py that imports no project file; method files that
import only common at module level (their command line reaches runner inside `main`), so a method
file plus common.py is the whole method; the rest one way (runner -> classtext -> data -> common), standalone
zeroshot.py and report.py; help that says what each flag expects; and the old `python common.py
...` and `python data.py prompts` commands pointing to the new ones."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = sorted(p.stem for p in REPO.glob("*.py"))


def project_imports(name):
    """{(imported project module, inside a function?)} of a top-level file."""
    tree = ast.parse((REPO / f"{name}.py").read_text())
    found = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.update((a.name.split(".")[0], inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.add((child.module.split(".")[0], inner))
            visit(child, inner)
    visit(tree, False)
    return {(m, inner) for m, inner in found if m in PROJECT or m == "importlib"}


def test_imports_run_one_way_without_circles_or_tricks():
    graph = {name: {m for m, _ in project_imports(name)} for name in PROJECT}
    for name in PROJECT:
        inner = {m for m, in_function in project_imports(name) if in_function}
        allowed = {"runner"} if name in ("biomedap", "biomedvr") else set()  # the method's `main` only
        assert inner <= allowed, f"{name}.py imports {inner - allowed} in a function"
        assert "importlib" not in graph[name], f"{name}.py looks modules up by name"
    assert graph["common"] == set() and graph["data"] == {"common"}
    assert graph["classtext"] == {"common", "data"}, "the class text imports no method file and no runner"
    assert graph["runner"] == {"classtext", "common", "data"}
    for name in ("biomedap", "biomedvr"):
        top = {m for m, in_function in project_imports(name) if not in_function}
        assert top == {"common"}, f"{name}.py imports {top - {'common'}} at module level: it must stand alone"
    assert graph["zeroshot"] <= {"classtext", "common", "data", "runner"}
    assert not any("report" in graph[n] or "zeroshot" in graph[n] for n in PROJECT if n != "report"), \
        "report.py and zeroshot.py are scripts: nothing imports them"

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, (*seen, m))) for m in graph[start])
    assert not [n for n in PROJECT if reaches(n, n)], "an import circle"


def test_files_stay_readable_sizes():
    lines = {name: len((REPO / f"{name}.py").read_text().splitlines()) for name in PROJECT}
    assert lines["common"] <= 500
    assert lines["biomedap"] < 700 and lines["biomedvr"] < 700
    assert lines["classtext"] < 1350


def run(*argv, cwd=REPO):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("script", ["biomedap.py", "biomedvr.py", "zeroshot.py", "report.py", "classtext.py"])
def test_help_says_what_each_flag_expects(script):
    out = run(script, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
    text = out.stdout
    assert "--no-" not in text and "(default: )" not in text and "(default: [])" not in text
    if script in ("biomedap.py", "biomedvr.py"):
        assert "--eval-only RUN_DIR" in text and "--predict RUN_DIR [IMAGE ...]" in text
        assert text.index("--dataset") < text.index("--eval-only"), "the method's own flags come first"
    if script == "zeroshot.py":
        assert "--subsample" in text and "--dataset" in text
    if script == "report.py":
        assert "RUNS_DIR" in text
    if script == "classtext.py":
        assert all(command in text for command in ("write", "starter", "import", "check"))
    if script != "report.py":
        assert "--class-text" in text or script == "classtext.py"


def test_the_old_common_commands_say_where_they_moved(tmp_path):
    (tmp_path / "runs").mkdir()
    out = run(str(REPO / "common.py"), "summarize", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr
    assert "moved to `python report.py`" in out.stderr and "no finished runs" in out.stdout
    out = run(str(REPO / "common.py"), "zeroshot", "--dataset", "no-such-set", "--backbone", "tiny")
    assert "moved to `python zeroshot.py`" in out.stderr and "error: unknown dataset" in out.stderr
    assert out.returncode == 2


def test_the_old_data_prompts_command_says_where_it_moved(tmp_path):
    (tmp_path / "mine" / "glioma_tumor").mkdir(parents=True)
    (tmp_path / "mine" / "normal").mkdir()
    out = run(str(REPO / "data.py"), "prompts", str(tmp_path / "mine"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("note: `python data.py prompts` moved to `python classtext.py starter`")
    assert list(json.loads((tmp_path / "mine" / "prompts.json").read_text())["classes"]) == ["glioma tumor", "normal"]
