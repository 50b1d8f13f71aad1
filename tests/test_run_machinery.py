"""Runs as users really have them (issue 26): a run's identity is every setting that changes its
numbers (a direct run, a sweep and the summary all compare it), options given to --eval-only win
even at their default, an output folder that cannot be written is refused before anything loads
and a full disk is one line that keeps the last checkpoint, the run folder's lock is beside the
folder (not in each process's own temporary folder), --predictions never clobbers or collides,
and Ctrl-C after the last epoch says the training is finished."""
import csv
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import biomedvr
import common
import report
import runner
from common import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--backbone", "tiny", "--shots", "2", "--epochs", "1", "--workers", "0",
        "--device", "cpu"]


def cli(argv):
    """biomedvr's command line in this process: its return value, or the exit code on SystemExit."""
    try:
        return runner.run_method(biomedvr, argv=argv)
    except SystemExit as exit_:
        return exit_.code


def folder_of(out):
    return runner.run_dir(str(out), "biomedvr", "synthetic", 2, 1, backbone="tiny")


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, lines  # one line, no traceback
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch tiny BioMedVR run: (its --out, its folder)."""
    out = tmp_path_factory.mktemp("finished") / "runs"
    assert isinstance(cli(TINY + ["--out", str(out)]), dict)
    return out, folder_of(out)


# ---------------------------------------------------------------- a run's identity
def test_a_direct_run_into_a_finished_run_of_other_settings_names_them(finished, capsys):
    out, folder = finished
    assert cli(TINY[:-6] + ["--epochs", "2", "--lr", "20", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 2
    assert error_line(capsys) == (f"error: {folder} holds a finished run made with other settings (--epochs 1 -> 2, "
                                  f"--lr 40.0 -> 20.0): pass --overwrite to replace it, or --out to write elsewhere")
    # flags that change no number (workers, device, root) are not a different run
    assert cli(TINY[:-4] + ["--workers", "1", "--root", "elsewhere", "--out", str(out)]) == 2
    assert "already holds a finished run" in error_line(capsys)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["seed1"]  # no lock left behind


def run_sh(*args, out):
    return subprocess.run(["bash", str(REPO / "run.sh"), *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)}, timeout=300)


def test_a_sweep_compares_finished_runs_with_its_settings(finished):
    out, folder = finished
    flags = ["--backbone", "tiny", "--workers", "0", "--device", "cpu"]
    same = run_sh("fewshot", "biomedvr", "synthetic", "2", "1", "--dry-run", "--", *flags, "--epochs", "1", out=out)
    assert same.returncode == 0 and same.stdout.strip() == "", same.stderr  # the run is there: nothing to do
    other = run_sh("fewshot", "biomedvr", "synthetic", "2", "1", "--dry-run", "--", *flags, "--epochs", "5", out=out)
    assert other.returncode == 2 and other.stdout.strip() == ""
    assert other.stderr.splitlines() == [
        "error: 1 finished run(s) were made with other settings than this sweep's (made -> asked):",
        f"  {folder}: --epochs 1 -> 5",
        "pass --overwrite after -- to replace them, or --out to write elsewhere; the sweep did not start"]
    again = run_sh("fewshot", "biomedvr", "synthetic", "2", "1", "--dry-run", "--", *flags, "--epochs", "5",
                   "--overwrite", out=out)
    assert again.returncode == 0, again.stderr
    (job,) = again.stdout.strip().splitlines()
    args = runner.parse_args(biomedvr, __import__("shlex").split(job)[2:])
    assert (args.epochs, args.overwrite, args.resume, args.seed) == (5, True, False, 1)


def record(folder, seed, accuracy, **settings):
    """A finished run's metrics.json as a training run writes it (arguments and identity)."""
    args = runner.cli_args(biomedvr)(dataset="synthetic", backbone="tiny", shots=2, seed=seed, **settings)
    runner.write_metrics(folder / f"seed{seed}", args, {"test": {"accuracy": accuracy}}, {})


def test_summaries_never_average_runs_of_different_settings(tmp_path):
    cell = tmp_path / "tiny" / "biomedvr" / "synthetic" / "2shot"
    record(cell, 1, 10.0, epochs=5)
    record(cell, 2, 20.0, epochs=5)
    record(cell, 3, 90.0)  # the default 400 epochs
    text = report.summarize(tmp_path)
    assert "40.00" not in text  # never the mean of all three
    assert "## tiny/biomedvr (--epochs 5): few-shot" in text and "| 15.00 ± 7.07 (2) |" in text
    assert "## tiny/biomedvr (--epochs 400): few-shot" in text and "| 90.00 (1 seed) |" in text
    assert "tiny/biomedvr: runs made with different settings (--epochs) are summarised apart" in text
    # runs that differ only in what changes no number share their row; so do records without an identity
    record(cell, 3, 30.0, epochs=5, workers=3, device="cpu")
    legacy = json.loads((cell / "seed3" / "metrics.json").read_text())
    del legacy["identity"]
    (cell / "seed3" / "metrics.json").write_text(json.dumps(legacy))
    text = report.summarize(tmp_path)
    assert "| 20.00 ± 10.00 (3) |" in text and "summarised apart" not in text


# ---------------------------------------------------------------- --eval-only: options given win
def test_eval_only_takes_options_given_at_their_default(finished, tmp_path, capsys):
    """A run trained in bf16 on a GPU, evaluated on a CPU: --precision fp32 is the default, and
    still wins because it is given (the record is made bf16 by hand: no GPU here)."""
    import shutil
    folder = tmp_path / "bf16run"
    shutil.copytree(finished[1], folder)
    ckpt = runner.load_checkpoint(folder)
    ckpt["args"]["precision"] = "bf16"
    runner.save_checkpoint(folder / "checkpoint.pt", ckpt)
    assert cli(["--eval-only", str(folder), "--device", "cpu", "--workers", "0"]) == 2
    assert "--precision bf16 needs a CUDA device" in error_line(capsys)
    metrics = cli(["--eval-only", str(folder), "--precision", "fp32", "--device", "cpu", "--workers", "0"])
    assert metrics["test"]["accuracy"] == json.loads((finished[1] / "metrics.json").read_text())["metrics"][
        "test"]["accuracy"]
    written = json.loads((folder / "metrics.json").read_text())
    assert written["evaluated_with"]["precision"] == "fp32" and written["args"]["precision"] == "fp32"
    assert runner.parse_args(biomedvr, ["--precision", "fp32"]).flags_given == {"precision"}


# ---------------------------------------------------------------- unwritable folders, a full disk
def _cannot_write(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("kind", ["read-only", "a file"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_loads(kind, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("loaded a backbone"))
    if kind == "read-only":
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
        if not _cannot_write(out):
            out.chmod(0o755)
            pytest.skip("this user writes into read-only folders (root): chmod cannot make one here")
        blocker = out
    else:
        blocker = tmp_path / "runs"
        blocker.write_text("not a folder")
        out = blocker
    try:
        assert cli(TINY + ["--out", str(out)]) == 2
    finally:
        if kind == "read-only":
            out.chmod(0o755)
    line = error_line(capsys)
    assert line.startswith(f"error: cannot write to {folder_of(out)}") and "--out" in line
    assert ("a file, not a folder" in line) if kind == "a file" else ("permission denied" in line)


def test_zero_shot_checks_its_output_folder_before_loading(tmp_path, monkeypatch):
    import zeroshot
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("loaded a backbone"))
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(UserError, match="runs is a file, not a folder"):
        zeroshot.main(zeroshot.Args(dataset="synthetic", backbone="tiny", out=str(tmp_path / "runs")))


def enospc_on(call: int, real):
    """torch.save as a disk that fills up on its `call`-th write."""
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    return save


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    argv = TINY[:-6] + ["--epochs", "3", "--workers", "0", "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(torch, "save", enospc_on(2, torch.save))
    assert cli(argv) == 2
    folder = folder_of(out)
    assert error_line(capsys) == (f"error: cannot write {folder / 'checkpoint.pt'}: no space left on device; "
                                  f"the checkpoint of epoch 1 is kept in {folder}; continue with --resume")
    assert runner.load_checkpoint(folder)["epoch"] == 1 and sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt"]
    monkeypatch.undo()
    assert isinstance(cli(argv + ["--resume"]), dict) and (folder / "metrics.json").is_file()


def test_a_full_disk_while_writing_the_results_keeps_the_checkpoint_to_evaluate(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "confusion.png":  # after metrics.json: the results would be half written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)
    monkeypatch.setattr(runner.os, "replace", replace)
    assert cli(TINY + ["--out", str(out)]) == 2
    folder = folder_of(out)
    assert error_line(capsys) == (f"error: cannot write {folder / 'confusion.png'}: no space left on device; "
                                  f"the checkpoint of epoch 1 (the last) is kept in {folder}; evaluate it with --resume")
    assert not (folder / "metrics.json").exists() and not list(folder.glob("*.tmp"))
    monkeypatch.undo()
    assert isinstance(cli(TINY + ["--out", str(out), "--resume"]), dict) and (folder / "metrics.json").is_file()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to stand for a full disk")
def test_a_real_no_space_error_from_torch_save_is_named(tmp_path):
    """The kernel's own ENOSPC: the temporary checkpoint is a link to /dev/full, a device that is
    always full. torch.save given a path would report it as an unexplained RuntimeError."""
    runner.save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.ones(3)})
    (tmp_path / "checkpoint.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(runner.WriteFailed, match="no space left on device"):
        runner.save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.zeros(1000, 1000)})
    assert torch.equal(runner.load_checkpoint(tmp_path)["x"], torch.ones(3))  # the last good one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------- the run folder's lock
HOLDER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import runner
run = runner.RunFolder(sys.argv[2])
print("locked", flush=True)
sys.stdin.read()
"""


def test_the_lock_is_beside_the_run_folder_for_every_temporary_folder(tmp_path, monkeypatch):
    """Two cluster jobs of one run folder, each with its own TMPDIR: the second is refused."""
    folder = tmp_path / "runs" / "biomedvr" / "synthetic" / "2shot" / "seed1"
    (tmp_path / "tmp_a").mkdir()
    (tmp_path / "tmp_b").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO), str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp_a")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp_b"))
        with pytest.raises(UserError, match="another run is writing to .*seed1 right now"):
            runner.RunFolder(folder)
        assert (folder.parent / ".seed1.lock").exists()
    finally:
        holder.communicate("", timeout=60)
    assert not (folder.parent / ".seed1.lock").exists()  # gone with the run that held it
    with runner.RunFolder(folder):
        pass


def test_a_run_that_fails_to_start_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "fresh" / "runs"
    assert cli(["--dataset", str(tmp_path / "no_such_folder"), *TINY[2:], "--out", str(out)]) == 2
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == []  # no lock, no folder made for it


# ---------------------------------------------------------------- --predictions
class FakePredictor:
    """What predict_cli needs of a finished run: class names, and probabilities per image."""
    classnames = ["a", "b"]

    def __init__(self, p_a: float):
        self.p_a = p_a

    def __call__(self, batch):
        return {"classnames": self.classnames,
                "probabilities": torch.tensor([[self.p_a, 1 - self.p_a]]).repeat(len(batch), 1)}


@pytest.fixture
def images(tmp_path):
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 200, 30)).save(tmp_path / f"{i}.png")
    return [str(tmp_path / f"{i}.png") for i in range(3)]


def test_an_existing_predictions_file_needs_overwrite(tmp_path, images):
    target = tmp_path / "preds.csv"
    target.write_text("someone's earlier predictions\n")
    args = runner.cli_args(biomedvr)(predict=[str(tmp_path / "run"), *images], predictions=str(target))
    with pytest.raises(UserError, match=f"{target} exists: pass --overwrite to replace it"):
        runner.predict_cli(args, lambda run_dir, device: pytest.fail("loaded the run"))
    assert target.read_text() == "someone's earlier predictions\n"
    args.overwrite = True
    runner.predict_cli(args, lambda run_dir, device: FakePredictor(0.75))
    with open(target) as f:
        assert [row["p(a)"] for row in csv.DictReader(f)] == ["0.750000"] * 3


# `--predict` with a stand-in for the run (FakePredictor's probabilities); it says "writing" and
# waits half-way through its rows until the file `pause` exists ("-": never), and says "waiting
# for the lock" before it takes the lock on the CSV (if it takes one).
PREDICTOR = r"""
import csv, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import biomedvr, runner
pause, p_a, argv = sys.argv[2], float(sys.argv[3]), sys.argv[4:]
class FakePredictor:
    classnames = ["a", "b"]
    def __call__(self, batch):
        return {"classnames": self.classnames, "probabilities": torch.tensor([[p_a, 1 - p_a]]).repeat(len(batch), 1)}
real = csv.DictWriter.writerows
def slow(self, rows):
    if pause != "-":
        print("writing", flush=True)
        while not os.path.exists(pause):
            time.sleep(0.05)
    return real(self, rows)
csv.DictWriter.writerows = slow
class AnnouncedLock(runner.FileLock):
    def acquire(self, *args, **kwargs):
        print("waiting for the lock", flush=True)
        return super().acquire(*args, **kwargs)
runner.FileLock = AnnouncedLock
runner.run_cli(lambda args: runner.predict_cli(args, lambda run_dir, device: FakePredictor()),
               runner.cli_args(biomedvr), argv=argv)
"""


def wait_for(proc, text: str) -> bool:
    """Read `proc`'s output until a line is `text` (True) or the output ends (False)."""
    return any(line.strip() == text for line in iter(proc.stdout.readline, ""))


def test_two_predict_runs_writing_one_csv_never_collide(tmp_path, images):
    target, go = tmp_path / "preds.csv", tmp_path / "go"

    def start(pause, p_a):
        argv = ["--backbone", "tiny", "--device", "cpu", "--predict", str(tmp_path / "run"), *images,
                "--predictions", str(target)]
        return subprocess.Popen([sys.executable, "-c", PREDICTOR, str(REPO), pause, str(p_a), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = start(str(go), 0.25)
    assert wait_for(first, "writing")  # the first is half-way through its file
    second = start("-", 0.75)
    wait_for(second, "waiting for the lock")  # the second, started meanwhile, reaches its write (or ends)
    go.touch()
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and out1.strip().endswith(f"3 predictions -> {target}"), err1
    assert second.returncode == 2 and err2.strip() == (
        f"error: {target} was written by another run while this one predicted: pass --overwrite to replace it, "
        f"or another --predictions file"), err2
    with open(target) as f:
        assert [row["p(a)"] for row in csv.DictReader(f)] == ["0.250000"] * 3  # the first's rows, whole
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".png")) == ["go", "preds.csv"]


# ---------------------------------------------------------------- Ctrl-C after the last epoch
def test_ctrl_c_right_after_the_last_epoch_says_the_training_is_finished(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    argv = TINY[:-6] + ["--epochs", "2", "--workers", "0", "--device", "cpu", "--out", str(out)]
    real = runner.epoch_line

    def interrupted_after_the_last(epoch, epochs, *args, **kwargs):  # its checkpoint is written by then
        if epoch == epochs:
            raise KeyboardInterrupt
        return real(epoch, epochs, *args, **kwargs)
    monkeypatch.setattr(runner, "epoch_line", interrupted_after_the_last)
    assert cli(argv) == 130
    folder = folder_of(out)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted after the last epoch (2 of 2): the training is finished and its checkpoint is kept in "
        f"{folder}; evaluate it with --resume")
    monkeypatch.undo()
    assert runner.load_checkpoint(folder)["epoch"] == 2
    assert isinstance(cli(argv + ["--resume"]), dict) and (folder / "metrics.json").is_file()
