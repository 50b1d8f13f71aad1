"""The two method files as siblings: the same flags with the same help, the same per-epoch line,
the same --eval-only behaviour, test-only flags hidden."""
import json
import re

import pytest

import biomedap
import biomedvr
import runner

SHARED = ["dataset", "shots", "seed", "subsample", "backbone", "root", "download", "eval_only", "predict",
          "predictions", "check_setup", "resume", "overwrite", "stop_after_epoch", "device", "precision", "workers",
          "benchmark", "out"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) loss \d+\.\d{4} ce \d+\.\d{4} .*train_acc \d+\.\d{2} lr \S+ .*time \d+\.\ds$")


def helps(module):
    parser = runner.build_parser(runner.cli_args(module))
    return {a.dest: a.help for a in parser._actions if a.dest != "help"}, parser.format_help()


def test_shared_flags_have_the_same_help_and_test_flags_are_hidden():
    (ap, ap_text), (vr, vr_text) = helps(biomedap), helps(biomedvr)
    assert {k: ap[k] for k in SHARED} == {k: vr[k] for k in SHARED}
    assert [f for f in ap if f in SHARED] == [f for f in vr if f in SHARED] == SHARED  # same order
    assert "--stop-after-epoch" not in ap_text and "--stop-after-epoch" not in vr_text


@pytest.mark.parametrize("module", [biomedap, biomedvr], ids=["biomedap", "biomedvr"])
def test_epoch_lines_eval_only_and_unfinished_runs_behave_alike(module, tmp_path, capsys):
    out = str(tmp_path / "runs")
    argv = ["--dataset", "synthetic", "--backbone", "tiny", "--shots", "2", "--epochs", "2", "--workers", "0",
            "--device", "cpu", "--out", out]
    runner.run_method(module, argv=argv + ["--stop-after-epoch", "1"])
    folder = runner.run_folder(module, runner.parse_args(module, argv))
    with pytest.raises(SystemExit) as exit_:
        runner.run_method(module, argv=["--eval-only", str(folder)])
    assert exit_.value.code == 2 and "is unfinished (epoch 1 of 2): finish it with --resume" in capsys.readouterr().err
    metrics = runner.run_method(module, argv=argv + ["--resume"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 1 and EPOCH_LINE.match(lines[0]) and lines[0].startswith("epoch 2/2 ")
    again = runner.run_method(module, argv=["--eval-only", str(folder), "--workers", "0"])
    record = json.loads((folder / "metrics.json").read_text())
    assert again["test"] == metrics["test"] == record["metrics"]["test"] and record["evaluated_with"] == {"workers": 0}
    assert set(runner.load_checkpoint(folder)) <= set(runner.FINISHED_CHECKPOINT_KEYS)
