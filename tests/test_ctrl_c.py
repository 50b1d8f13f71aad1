"""Ctrl-C as a terminal sends it (SIGINT to the whole process group, loader workers included) at
each moment of a run: one line, exit 130, no traceback from any process, the last checkpoint intact.
Each run is a real process; a small harness announces the moment on stdout and, for evaluation and
the final writes, makes that moment last long enough to be hit."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import runner

REPO = Path(__file__).resolve().parents[1]
# Runs a method's command line as `python METHOD.py` does. "evaluation": after training, each
# evaluation batch takes 0.2 s more (the workers stay busy loading); "results": the first file
# of the results takes 1 s more. Each prints a line when its moment begins.
HARNESS = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import common, data, runner
module = __import__(sys.argv[2])
moment, argv = sys.argv[3], sys.argv[4:]
evaluating = []
if moment == "evaluation":
    real_evaluate_run, real_iter = module.evaluate_run, data.Loader.__iter__
    def evaluate_run(*args, **kwargs):
        evaluating.append(True)
        return real_evaluate_run(*args, **kwargs)
    def slow_iter(self):
        for batch in real_iter(self):
            if evaluating:
                print("evaluating", flush=True)
                time.sleep(0.2)
            yield batch
    module.evaluate_run, data.Loader.__iter__ = evaluate_run, slow_iter
if moment == "results":
    real_write = runner.atomic_write_text
    def slow_write(*args, **kwargs):
        print("writing", flush=True)
        time.sleep(1)
        return real_write(*args, **kwargs)
    runner.atomic_write_text = slow_write
runner.run_method(module, argv=argv)
"""


def interrupt(name, moment, wait_for, argv, tmp_path):
    """Start the run in its own session, send SIGINT to its group once a line starts with
    `wait_for`; (exit code, stderr lines, run folder)."""
    out = tmp_path / "runs"
    argv = ["--dataset", "synthetic", "--backbone", "tiny", "--shots", "2", "--device", "cpu", "--workers", "2",
            "--out", str(out), *argv]
    proc = subprocess.Popen([sys.executable, "-u", "-c", HARNESS, str(REPO), name, moment, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline, seen = time.time() + 120, []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(wait_for) or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert seen and seen[-1].startswith(wait_for), "".join(seen) + err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]  # e.g. text cut by tiny
    return proc.returncode, lines, runner.run_dir(str(out), name, "synthetic", 2, 1, backbone="tiny")


def assert_intact(folder):
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    return runner.load_checkpoint(folder)


def test_during_an_epoch_with_workers(tmp_path):  # tests/test_reliability.py: biomedap without workers
    name = "biomedvr"
    code, err, folder = interrupt(name, "epoch", "epoch 2/", ["--epochs", "500"], tmp_path)
    assert code == 130 and len(err) == 1, err  # the one line: no traceback from the main process or a worker
    words = err[0].split()
    assert err[0].endswith("continue with --resume") and words[:2] in (["interrupted", "during"],
                                                                      ["interrupted", "after"]), err
    ckpt = assert_intact(folder)
    if words[1] == "during":  # interrupted during epoch N; the checkpoint of epoch N-1 is kept
        epoch = int(words[3].rstrip(";"))
        assert f"the checkpoint of epoch {epoch - 1} is kept in {folder};" in err[0] and ckpt["epoch"] == epoch - 1
    else:  # it came while a checkpoint was written: interrupted after epoch N; its checkpoint is kept
        assert ckpt["epoch"] == int(words[3].rstrip(";"))
    assert ckpt["epoch"] >= 2 and not (folder / "metrics.json").exists()


def test_during_evaluation_with_workers(tmp_path):
    code, err, folder = interrupt("biomedap", "evaluation", "evaluating", ["--epochs", "2", "--test-batch-size", "20"],
                                  tmp_path)
    assert code == 130 and err == [f"interrupted during evaluation; the checkpoint of epoch 2 (the last) is kept "
                                   f"in {folder}; evaluate it with --resume"]
    assert assert_intact(folder)["epoch"] == 2 and not (folder / "metrics.json").exists()


def test_while_the_results_are_written_they_are_completed_first(tmp_path):
    code, err, folder = interrupt("biomedvr", "results", "writing", ["--epochs", "1"], tmp_path)
    assert code == 130 and err == [f"interrupted while the results were written; they were completed first in {folder}"]
    ckpt = assert_intact(folder)
    assert set(ckpt) <= set(runner.FINISHED_CHECKPOINT_KEYS) and ckpt["epoch"] == 1  # the finished checkpoint
    assert {"metrics.json", "confusion.png", "programs.png"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["test"]["n"] == 160
