"""run.sh and the README: the smoke jobs end to end, the sweeps' job lists, and every
command the README shows being one the CLIs accept."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import biomedap
import biomedvr
import classtext
import zeroshot
import report
import runner

REPO = Path(__file__).resolve().parents[1]
DATASETS = "btmri busi chmnist covid ctkidney dermamnist kneexray kvasir lungcolon octmnist retina".split()
METHODS = {"biomedap.py": biomedap, "biomedvr.py": biomedvr}


def run_sh(*args, env=None):
    out = subprocess.run(["bash", str(REPO / "run.sh"), *args], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def parse_job(line):
    """A job line 'python METHOD.py FLAGS' -> (module, Args), parsed by the method's own CLI."""
    argv = shlex.split(line)
    assert argv[0] in ("python", "python3") and (argv[1] in METHODS or argv[1] == "zeroshot.py"), line
    if argv[1] == "zeroshot.py":
        return zeroshot, runner.parse_args(zeroshot.Args, argv[2:])
    module = METHODS[argv[1]]
    return module, runner.parse_args(module, argv[2:])


def test_tables_dry_run_lists_exactly_the_published_runs():
    jobs = [parse_job(line) for line in run_sh("tables", "biomedap", "--dry-run", env={"OUT": "/nonexistent"})]
    few = {(a.dataset, a.shots, a.seed) for m, a in jobs if a.subsample == "all"}
    b2n = {(a.dataset, a.shots, a.seed) for m, a in jobs if a.subsample == "base"}
    assert few == {(d, k, s) for d in DATASETS for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)}
    assert b2n == {(d, 16, s) for d in DATASETS for s in (1, 2, 3)}
    assert len(jobs) == 165 + 33 and all(m is biomedap for m, _ in jobs)
    vr = [parse_job(line) for line in run_sh("tables", "biomedvr", "--dry-run", env={"OUT": "/nonexistent"})]
    assert {(a.dataset, a.shots, a.seed, a.subsample) for _, a in vr} == \
        {(d, 16, s, "all") for d in DATASETS for s in (1, 2, 3)}
    assert all(m is biomedvr and a.cs_anchor == "fused" for m, a in vr)  # the released Table-1 loss
    assert all(a.backbone == "clip" and "--backbone clip" in line  # on the paper's backbone
               for (_, a), line in zip(vr, run_sh("tables", "biomedvr", "--dry-run", env={"OUT": "/nonexistent"})))


def test_biomedvr_table_uses_the_released_anchor_and_flags_still_override():
    lines = run_sh("tables", "biomedvr", "--dry-run", "--", "--backbone", "clip", env={"OUT": "/nonexistent"})
    assert all(a.cs_anchor == "fused" and a.backbone == "clip" for _, a in map(parse_job, lines))
    lines = run_sh("tables", "biomedvr", "--dry-run", "--", "--cs-anchor", "positive", env={"OUT": "/nonexistent"})
    assert all(a.cs_anchor == "positive" for _, a in map(parse_job, lines))
    lines = run_sh("tables", "biomedvr", "--dry-run", "--", "--backbone", "biomedclip", env={"OUT": "/nonexistent"})
    assert len(lines) == 33 and all(a.backbone == "biomedclip" for _, a in map(parse_job, lines))
    # a plain sweep keeps the default anchor (the paper's figure)
    lines = run_sh("fewshot", "biomedvr", "btmri", "16", "1", "--dry-run", env={"OUT": "/nonexistent"})
    assert [parse_job(line)[1].cs_anchor for line in lines] == ["positive"]


def test_sweep_skips_finished_runs_and_resumes_unfinished(tmp_path):
    done = tmp_path / "biomedap" / "btmri" / "4shot" / "seed1"
    runner.atomic_write_json(done / "metrics.json", {"metrics": {"test": {"accuracy": 50.0}}})
    half = tmp_path / "biomedap" / "btmri" / "4shot" / "seed2"
    half.mkdir(parents=True)
    (half / "checkpoint.pt").write_bytes(b"")
    lines = run_sh("fewshot", "biomedap", "btmri", "4", "1 2 3", "--dry-run", env={"OUT": str(tmp_path)})
    jobs = [parse_job(line)[1] for line in lines]
    assert [(a.seed, a.resume) for a in jobs] == [(2, True), (3, False)]
    # the official variant writes elsewhere, so nothing is skipped for it
    lines = run_sh("fewshot", "biomedap", "btmri", "4", "1", "--dry-run", "--", "--variant", "official",
                   env={"OUT": str(tmp_path)})
    assert len(lines) == 1 and parse_job(lines[0])[1].variant == "official"
    # robustness on a finished run without robustness numbers re-evaluates it
    lines = run_sh("robustness", "biomedap", "btmri", "4", "1", "--dry-run", env={"OUT": str(tmp_path)})
    args = parse_job(lines[0])[1]
    assert args.eval_only == str(done) and args.robustness


def test_smoke_jobs_end_to_end(tmp_path, monkeypatch, capsys):
    """The jobs of `bash run.sh smoke`, run in this process (saving the imports), then the summary.
    Each says what it read before anything else, and the shipped synthetic text warns of nothing."""
    lines = run_sh("smoke", "--dry-run", env={"OUT_SMOKE": str(tmp_path)})
    assert len(lines) == 6  # per backbone: both methods and the zero-shot baseline
    for line in lines:
        module, args = parse_job(line)
        assert args.dataset == "synthetic" and args.backbone in ("tiny", "tiny-clip")
        args.workers = 0
        capsys.readouterr()
        zeroshot.main(args) if module is zeroshot else runner.run(module, args)
        out, err = capsys.readouterr()
        assert "warning" not in err, (line, err)
        assert out.startswith("data: synthetic: 4 classes of generated shapes") and "data: test 160 images" in out
    for record in tmp_path.rglob("metrics.json"):
        data = json.loads(record.read_text())["data"]
        assert data["images"]["test"] == dict.fromkeys(data["classes"], 40) and data["left_out"] == []
    text = report.summarize(tmp_path)
    for backbone in ("tiny", "tiny-clip"):
        for method in ("biomedap", "biomedvr"):  # the K=0 column is the zero-shot run's
            match = re.search(rf"## {backbone}/{method}: few-shot.*?\| synthetic \| 160 \| ([\d.]+) \| ([\d.]+) "
                              rf"\(1 seed\) \|", text, re.S)  # n: the 160 test images
            assert match, text
            assert 0.0 <= float(match.group(1)) <= 100.0 and 0.0 <= float(match.group(2)) <= 100.0
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "fewshot.png").is_file()


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_is_accepted(line):
    argv = shlex.split(line.split(" #")[0].split(" | ")[0].split(" > ")[0].split(" < ")[0])
    while argv and re.match(r"^[A-Z_]+=", argv[0]):   # leading VAR=value assignments
        argv.pop(0)
    if argv[0] in ("python", "python3") and argv[1] in METHODS:
        parse_job(shlex.join(argv))
    elif argv[:2] == ["bash", "run.sh"]:
        if argv[2] != "summarize":
            jobs = run_sh("--dry-run", *[a for a in argv[2:] if a != "--dry-run"], env={"OUT": "/nonexistent"})
            assert jobs
            for job in jobs:
                if shlex.split(job)[1] == "zeroshot.py":
                    runner.parse_args(zeroshot.Args, shlex.split(job)[2:])
                else:
                    parse_job(job)
    elif argv[:2] == ["python", "zeroshot.py"]:
        runner.parse_args(zeroshot.Args, argv[2:])
    elif argv[:2] == ["python", "report.py"]:
        assert len(argv) <= 3
    elif argv[:2] == ["python", "classtext.py"]:
        classtext.build_parser().parse_args(argv[2:])
    else:
        assert argv[0] in ("pip", "python", "python3", "hf", "sbatch", "parallel"), line


def test_sweeps_keep_backbones_and_variants_apart(tmp_path):
    """A finished BiomedCLIP run with the paper's anchor is not mistaken for a CLIP run or for a
    run of the released Table-1 anchor: each has its own folder, which the sweep checks."""
    env = {"OUT": str(tmp_path)}
    runner.atomic_write_json(tmp_path / "biomedvr" / "btmri" / "16shot" / "seed1" / "metrics.json", {"metrics": {}})
    assert run_sh("fewshot", "biomedvr", "btmri", "16", "1", "--dry-run", env=env) == []
    clip = [parse_job(line)[1] for line in run_sh("fewshot", "biomedvr", "btmri", "16", "1", "--dry-run", "--",
                                                   "--backbone", "clip", env=env)]
    assert [(a.dataset, a.backbone) for a in clip] == [("btmri", "clip")]
    assert runner.run_dir(str(tmp_path), "biomedvr", "btmri", 16, 1, backbone="clip") == \
        tmp_path / "clip" / "biomedvr" / "btmri" / "16shot" / "seed1"
    table = [parse_job(line)[1] for line in run_sh("tables", "biomedvr", "--dry-run", env=env)]
    assert ("btmri", 1) in {(a.dataset, a.seed) for a in table} and {a.cs_anchor for a in table} == {"fused"}
    runner.atomic_write_json(tmp_path / "biomedvr-fused" / "btmri" / "16shot" / "seed1" / "metrics.json", {})
    table = [parse_job(line)[1] for line in run_sh("tables", "biomedvr", "--dry-run", env=env)]
    assert ("btmri", 1) in {(a.dataset, a.seed) for a in table}  # a BiomedCLIP run is not Table 1's
    runner.atomic_write_json(tmp_path / "clip" / "biomedvr-fused" / "btmri" / "16shot" / "seed1" / "metrics.json", {})
    table = [parse_job(line)[1] for line in run_sh("tables", "biomedvr", "--dry-run", env=env)]
    assert ("btmri", 1) not in {(a.dataset, a.seed) for a in table} and len(table) == 32
    table = run_sh("tables", "biomedvr", "--dry-run", "--", "--backbone", "biomedclip", env=env)
    assert len(table) == 32  # the BiomedCLIP variant of the sweep finds its own


def test_sweeps_skip_finished_runs_of_your_own_folder(tmp_path):
    """run.sh looks for your folder's runs where the methods write them: under the folder's own name."""
    own = tmp_path / "data" / "My_Scans"
    own.mkdir(parents=True)
    env = {"OUT": str(tmp_path / "runs")}
    assert len(run_sh("fewshot", "biomedvr", str(own), "2", "1", "--dry-run", env=env)) == 1
    runner.atomic_write_json(runner.run_dir(str(tmp_path / "runs"), "biomedvr", str(own), 2, 1) / "metrics.json", {})
    assert run_sh("fewshot", "biomedvr", str(own), "2", "1", "--dry-run", env=env) == []
    assert run_sh("fewshot", "biomedvr", "BTMRI", "2", "1", "--dry-run", env=env) != []
    runner.atomic_write_json(runner.run_dir(str(tmp_path / "runs"), "biomedvr", "BTMRI", 2, 1) / "metrics.json", {})
    assert run_sh("fewshot", "biomedvr", "BTMRI", "2", "1", "--dry-run", env=env) == []


def test_sweeps_keep_runs_on_other_class_text_apart(tmp_path):
    """A finished run on the dataset's own text is not one on --class-text FILE: the sweep looks in
    text-<hash>/, where the method writes it, and a missing file stops it at once."""
    text = tmp_path / "released.json"
    text.write_text('{"template": "a MR photo of a {} in the brain.", "classes": {}}')
    env = {"OUT": str(tmp_path / "runs")}  # run.sh hashes the file with python
    runner.atomic_write_json(runner.run_dir(str(tmp_path / "runs"), "biomedvr", "btmri", 16, 1) / "metrics.json", {})
    assert run_sh("fewshot", "biomedvr", "btmri", "16", "1", "--dry-run", env=env) == []
    [job] = run_sh("fewshot", "biomedvr", "btmri", "16", "1", "--dry-run", "--", "--class-text", str(text), env=env)
    args = parse_job(job)[1]
    assert args.class_text == str(text)
    folder = runner.run_folder(biomedvr, args)
    assert folder.parts[-5] == classtext.class_text_folder(text)
    runner.atomic_write_json(folder / "metrics.json", {})
    flags = ["--dry-run", "--", "--class-text", str(text)]
    assert run_sh("fewshot", "biomedvr", "btmri", "16", "1", *flags, env=env) == []
    out = subprocess.run(["bash", str(REPO / "run.sh"), "zeroshot", "btmri", "--dry-run", "--", "--class-text",
                          str(tmp_path / "missing.json")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "--class-text" in out.stderr and "is not a file" in out.stderr


def run_as_shell(line):
    """What a --dry-run line runs: its words, with `python` a shell function that prints them."""
    shown = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" "$@"; }; eval "$1"', "_", line],
                           capture_output=True, text=True, check=True).stdout
    return shown.split("\0")[:-1]


@pytest.mark.parametrize("form", ["--out {}", "--out={}"])
def test_out_after_the_dashes_is_where_the_sweep_looks_and_summarizes(tmp_path, form):
    mine = tmp_path / "mine"
    flags = form.format(mine).split()
    runner.atomic_write_json(mine / "biomedap" / "btmri" / "1shot" / "seed1" / "metrics.json",
                             {"metrics": {"test": {"accuracy": 61.0}}})
    (mine / "biomedap" / "btmri" / "1shot" / "seed2").mkdir(parents=True)
    (mine / "biomedap" / "btmri" / "1shot" / "seed2" / "checkpoint.pt").write_bytes(b"")
    env = {"OUT": str(tmp_path / "default")}
    jobs = [parse_job(line)[1] for line in run_sh("fewshot", "biomedap", "btmri", "1", "1 2", "--dry-run", "--",
                                                  *flags, env=env)]
    assert [(a.seed, a.resume, a.out) for a in jobs] == [(2, True, str(mine))]
    # nothing left to run: the sweep goes straight to the summary, of that folder
    run_sh("fewshot", "biomedap", "btmri", "1", "1", "--", *flags, env={**env, "PYTHON": sys.executable})
    assert "61.00" in (mine / "summary.md").read_text() and not (tmp_path / "default").exists()


def test_a_dataset_folder_with_spaces_and_shell_characters_in_every_command(tmp_path):
    folder = tmp_path / "my scans; $HOME 'x' \"y\" (1) *"
    folder.mkdir()
    env = {"OUT": str(tmp_path / "runs")}
    commands = {("fewshot", "biomedap", str(folder), "2", "1"): 1, ("base2novel", "biomedvr", str(folder), "1"): 1,
                ("robustness", "biomedap", str(folder), "16", "1"): 1, ("zeroshot", str(folder)): 1,
                ("fewshot", "biomedvr", f"btmri,{folder}", "2", "1"): 2,
                ("fewshot", "biomedvr", f"btmri\n {folder}\n", "2", "1 2"): 4}
    for command, count in commands.items():
        lines = run_sh(*command, "--dry-run", env=env)
        assert len(lines) == count, lines
        argv = run_as_shell(lines[-1])  # the line, run by a shell, gives exactly the job's words
        assert argv == shlex.split(lines[-1])[1:] and argv[argv.index("--dataset") + 1] == str(folder)
    # its finished runs are found under the folder's own name
    runner.atomic_write_json(runner.run_dir(str(tmp_path / "runs"), "biomedap", str(folder), 2, 1) / "metrics.json", {})
    assert run_sh("fewshot", "biomedap", str(folder), "2", "1", "--dry-run", env=env) == []


ABLATION_ROWS = {"biomedap": 12, "biomedvr": 5}


@pytest.mark.parametrize("method", ["biomedap", "biomedvr"])
def test_ablations_print_one_job_per_row_each_in_its_own_folder(tmp_path, method):
    env = {"OUT": str(tmp_path)}
    lines = run_sh("ablations", method, "btmri", "16", "1", "--dry-run", env=env)
    jobs = [parse_job(line) for line in lines]
    assert len(jobs) == ABLATION_ROWS[method] and all(m is METHODS[f"{method}.py"] for m, _ in jobs)
    assert all((a.dataset, a.shots, a.seed) == ("btmri", 16, 1) for _, a in jobs)
    folders = [runner.run_folder(m, a) for m, a in jobs]
    assert len(set(folders)) == len(folders) and folders[0].parts[-4] == method  # the first row: the full method
    if method == "biomedvr":  # the AttrVR row
        assert [(a.experts, a.beta) for _, a in jobs][-1] == ("positive", 0.0)
    else:
        assert {a.low_anchor for _, a in jobs} == {None, "minimal", "article", "generic", "medical", "empty"}
        assert len(run_sh("ablations", method, "btmri", "16", "1", "--dry-run", "--", "--variant", "official",
                          env=env)) == 11  # no confidence weight to drop, prototypes instead of minimal
    # the default sweep: 16 shots, seed 1, one job a row; seeds 1-3 when asked
    assert len(run_sh("ablations", method, "btmri", "--dry-run", env=env)) == ABLATION_ROWS[method]  # one job a row
    assert len(run_sh("ablations", method, "btmri,busi", "16", "1,2,3", "--dry-run", env=env)) == ABLATION_ROWS[method] * 2 * 3
    # the sweep looks for each row's runs where the method writes them: all finished, nothing left
    for m, a in jobs:
        runner.atomic_write_json(runner.run_folder(m, a) / "metrics.json", {})
    assert run_sh("ablations", method, "btmri", "16", "1", "--dry-run", env=env) == []


@pytest.mark.parametrize("method, flags", [
    ("biomedap", ["--fusion-layers", "3", "06", "--lambda-kl", "0.0"]),
    ("biomedap", ["--variant=official", "--low-anchor=prototypes", "--alpha", "0e0"]),
    ("biomedap", ["--fusion-layers", "none", "--lambda-high=0", "--variant", "paper", "--low-anchor", "prototypes"]),
    ("biomedvr", ["--gate-lr", "0.40", "--beta=0.0", "--cs-anchor", "fused"]),
    ("biomedvr", ["--programs", "01", "--gate", "fixed", "--backbone", "clip"]),
    ("biomedvr", ["--experts", "positive", "--beta", "0", "--gate-lr", "1e-3", "--experts", "both"])])
def test_run_sh_names_a_run_folder_as_the_method_does(tmp_path, method, flags):
    env = {"OUT": str(tmp_path)}
    [line] = run_sh("fewshot", method, "btmri", "2", "1", "--dry-run", "--", *flags, env=env)
    module, args = parse_job(line)
    runner.atomic_write_json(runner.run_folder(module, args) / "metrics.json", {})
    assert run_sh("fewshot", method, "btmri", "2", "1", "--dry-run", "--", *flags, env=env) == []


def test_ablations_need_a_method_and_datasets():
    for argv, message in ((["ablations", "zeroshot", "btmri"], "biomedap or biomedvr"), (["ablations", "biomedap"], "DATASETS")):
        out = subprocess.run(["bash", str(REPO / "run.sh"), *argv, "--dry-run"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.splitlines()) == 1
