"""Nothing lost, nothing silent, for both methods: --overwrite keeps a finished run until the
new run has a checkpoint, --resume refuses changes that change the numbers, Ctrl-C leaves one
line and the last checkpoint, finished folders keep only what evaluation needs, and the shared
arguments are checked before anything is loaded."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import biomedap
import biomedvr
import common
import report
import runner
from common import UserError

REPO = Path(__file__).resolve().parents[1]
METHODS = {"biomedap": biomedap, "biomedvr": biomedvr}
TINY = ["--dataset", "synthetic", "--backbone", "tiny", "--shots", "2", "--epochs", "1", "--workers", "0",
        "--device", "cpu"]


def cli(module, argv):
    """run_cli as the command line runs it: the return value, or the exit code on SystemExit."""
    try:
        return module.__name__, runner.run_method(module, argv=argv)
    except SystemExit as exit_:
        return module.__name__, exit_.code


def folder_of(name, out):
    return runner.run_dir(str(out), name, "synthetic", 2, 1, backbone="tiny")


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("name", METHODS)
def test_overwrite_that_fails_to_start_keeps_the_finished_run(name, tmp_path, capsys):
    module, out = METHODS[name], tmp_path / "runs"
    cli(module, TINY + ["--out", str(out)])
    folder = folder_of(name, out)
    before = snapshot(folder)
    assert {"metrics.json", "checkpoint.pt", "confusion.png"} <= set(before)
    for bad in (["--backbone", "local-dir:/does/not/exist"], ["--dataset", "no_such_dataset_here"]):
        assert cli(module, TINY + ["--out", str(out), "--overwrite"] + bad)[1] == 2
        assert "error:" in capsys.readouterr().err
        assert snapshot(folder) == before  # byte-identical
    assert sorted(p.name for p in folder.parent.iterdir()) == ["seed1"]
    # a finished folder holds the trainable tensors and the arguments, not optimiser or random states
    assert set(runner.load_checkpoint(folder)) <= set(runner.FINISHED_CHECKPOINT_KEYS)
    # an --overwrite that does start replaces the old run
    cli(module, TINY + ["--out", str(out), "--overwrite", "--seed", "1"])
    assert set(snapshot(folder)) == set(before)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("change", [["--batch-size", "2"], ["--precision", "bf16"], ["--shots", "2", "--seed", "1",
                                                                                   "--epochs", "3"]])
def test_resume_refuses_every_change_that_changes_the_numbers(name, change, tmp_path, capsys):
    module, out = METHODS[name], tmp_path / "runs"
    argv = TINY[:-6] + ["--epochs", "2", "--workers", "0", "--device", "cpu", "--out", str(out)]
    cli(module, argv + ["--stop-after-epoch", "1"])
    code = cli(module, argv + change + ["--resume"])[1]
    err = capsys.readouterr().err
    assert code == 2 and ("different settings" in err or "bf16 needs a CUDA" in err)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [["--shots", "0"], ["--shots", "-1"], ["--epochs", "0"], ["--batch-size", "0"],
                                 ["--seed", "-1"], ["--workers", "-2"]])
def test_shared_arguments_are_checked_before_anything_loads(name, bad, tmp_path, capsys, monkeypatch):
    module = METHODS[name]
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("loaded a backbone"))
    assert cli(module, TINY + ["--out", str(tmp_path)] + bad)[1] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --") and "must be a whole number" in err and "\n" not in err
    assert not (tmp_path / name).exists()


def test_ctrl_c_in_process_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = []
    real = biomedvr.train_one_epoch

    def interrupt_in_epoch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(biomedvr, "train_one_epoch", interrupt_in_epoch_3)
    argv = TINY[:-6] + ["--epochs", "5", "--workers", "0", "--device", "cpu", "--out", str(tmp_path)]
    assert cli(biomedvr, argv)[1] == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted during epoch 3; the checkpoint of epoch 2 is kept in {folder_of('biomedvr', tmp_path)}; "
        f"continue with --resume")
    assert runner.load_checkpoint(folder_of("biomedvr", tmp_path))["epoch"] == 2


def test_sigint_during_training_exits_130_with_one_line(tmp_path):
    argv = [sys.executable, "-u", str(REPO / "biomedap.py"), *TINY[:-6], "--epochs", "500", "--workers", "0",
            "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    for line in proc.stdout:  # wait for the second epoch's line: a checkpoint exists
        if line.startswith("epoch 2/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("interrupted during epoch ")
    epoch = int(lines[-1].split()[3].rstrip(";"))
    assert f"the checkpoint of epoch {epoch - 1} is kept" in lines[-1] and lines[-1].endswith("continue with --resume")
    assert runner.load_checkpoint(folder_of("biomedap", tmp_path))["epoch"] == epoch - 1


def test_sweep_stops_at_a_setup_error_before_any_job(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(REPO / "run.sh"), "fewshot", "biomedvr", "btmri busi", "1", "1 2", "--",
                           "--root", str(tmp_path / "nowhere"), "--backbone", "tiny"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("error: dataset btmri not found") == 1 and "jobs to run" not in done.stderr
    assert not (tmp_path / "runs").exists()
    ok = subprocess.run([sys.executable, str(REPO / "biomedvr.py"), "--check-setup", "synthetic", "--backbone",
                         "tiny"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "setup ok" in ok.stderr


@pytest.mark.parametrize("name", METHODS)
def test_more_shots_than_a_class_has_warns_and_records_the_real_counts(name, tmp_path, capsys):
    module = METHODS[name]
    argv = ["--dataset", "synthetic", "--backbone", "tiny", "--shots", "40", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--out", str(tmp_path)]
    cli(module, argv)
    assert "warning: 40 shots asked" in capsys.readouterr().err
    record = __import__("json").loads((runner.run_dir(str(tmp_path), name, "synthetic", 40, 1, backbone="tiny") / "metrics.json")
                                      .read_text())
    assert record["shots_per_class"] == {c: 32 for c in __import__("data").SYNTHETIC_LOOKS}


def test_dataset_names_in_any_case_share_one_run_folder(tmp_path, monkeypatch):
    for spelling in ("BUSI", "Busi", "busi"):
        assert runner.run_dir("runs", "m", spelling, 4, 1) == Path("runs/m/busi/4shot/seed1")
    (tmp_path / "my_folder").mkdir()
    monkeypatch.chdir(tmp_path / "my_folder")
    assert runner.run_dir("runs", "m", ".", 4, 1) == runner.run_dir("runs", "m", "../my_folder/", 4, 1) \
        == Path("runs/m/my_folder/4shot/seed1")


@pytest.mark.parametrize("argv", [["--predict"], ["--lr", "abc"], ["--subsample", "xx"], ["--shots", "many"]])
def test_a_bad_command_line_is_one_line(argv, capsys):
    for module in METHODS.values():
        with pytest.raises(SystemExit) as exit_:
            runner.parse_args(module, argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: argument ") and err.count("\n") == 1


def test_summarize_refuses_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(common.UserError, match="is not a folder"):
        report.summarize(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("name,bad,message", [
    ("biomedap", ["--lr", "nan"], "finite"), ("biomedap", ["--alpha", "nan"], "finite"),
    ("biomedap", ["--lr", "-1"], "--lr must be a number > 0"), ("biomedap", ["--fusion-dropout", "2"], "--fusion-dropout"),
    ("biomedap", ["--n-prompts", "0"], "--n-prompts"), ("biomedap", ["--fusion-heads", "0"], "--fusion-heads"),
    ("biomedvr", ["--gate-init", "inf"], "finite"), ("biomedvr", ["--lr", "nan"], "finite"),
    ("biomedvr", ["--predictions", "x.csv"], "give --predict too")])
def test_settings_that_cannot_train_are_refused_before_loading(name, bad, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_backbone", lambda *a, **k: pytest.fail("loaded a backbone"))
    assert cli(METHODS[name], TINY + ["--out", str(tmp_path)] + bad)[1] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    first = runner.RunFolder(tmp_path / "run", overwrite=False, resume=False)
    with pytest.raises(UserError, match="another run is writing to"):
        runner.RunFolder(tmp_path / "run", overwrite=False, resume=False)
    del first
    import gc
    gc.collect()  # the lock goes with its process (here: with the object)
    runner.RunFolder(tmp_path / "run", overwrite=False, resume=False)


def test_predict_uses_the_runs_own_class_text_and_path(tmp_path, capsys):
    import shutil
    import data
    folder = tmp_path / "shapes"
    for label, cls in enumerate(list(data.SYNTHETIC_LOOKS)[:2]):
        (folder / cls).mkdir(parents=True)
        for i in range(5):
            data.draw_synthetic(f"synthetic:p:{4 * i + label}:40").save(folder / cls / f"{i}.png")
    text = data.synthetic_class_text()
    (folder / "prompts.json").write_text(__import__("json").dumps(text))
    os.chdir(folder)
    try:
        cli(biomedvr, ["--dataset", ".", *TINY[2:], "--out", str(tmp_path / "runs")])
    finally:
        os.chdir(REPO)
    run_dir = runner.run_dir(str(tmp_path / "runs"), "biomedvr", str(folder), 2, 1, backbone="tiny")
    assert runner.load_checkpoint(run_dir)["args"]["dataset"] == str(folder.resolve())
    image = tmp_path / "one.png"
    shutil.copy(folder / "red disc" / "0.png", image)
    before = cli(biomedvr, ["--predict", str(run_dir), str(image), "--device", "cpu"])[1]
    shutil.rmtree(folder)  # the dataset is gone: the run still predicts, the same way
    after = cli(biomedvr, ["--predict", str(run_dir), str(image), "--device", "cpu"])[1]
    assert before == after and len(after) == 1


def test_a_folder_with_one_class_is_refused(tmp_path):
    import data
    (tmp_path / "only").mkdir()
    for i in range(4):
        data.draw_synthetic(f"synthetic:o:{4 * i}:16").save(tmp_path / "only" / f"{i}.png")
    with pytest.raises(UserError, match="at least 2 classes"):
        data.load_splits(str(tmp_path))


def test_predictions_into_a_folder_and_wrong_shaped_summaries(tmp_path, capsys):
    args = runner.cli_args(biomedvr)(predict=[str(tmp_path), "x.png"], predictions=str(tmp_path))
    with pytest.raises(UserError, match="is a folder"):
        runner.predict_cli(args, lambda run_dir, device: runner.load_run(biomedvr, run_dir, device))
    for i, content in enumerate(([1, 2], {"args": {}, "metrics": {}}, {"metrics": {"test": {"accuracy": 50.0}}})):
        runner.atomic_write_json(tmp_path / "m" / "busi" / "4shot" / f"seed{i + 1}" / "metrics.json", content)
    text = report.summarize(tmp_path)
    assert "50.00 (1 seed)" in text and capsys.readouterr().err.count("not a readable metrics.json") == 2


def test_local_dir_with_a_config_of_the_wrong_shape_is_one_line(tmp_path):
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": "x"}}')
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(UserError, match="does not describe an open_clip model"):
        common.load_backbone(f"local-dir:{tmp_path}")
