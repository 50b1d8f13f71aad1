"""--predict and load_run: a finished tiny run classifies image files exactly as its own
evaluation did, from the command line (printed top 3, CSV) and as an importable function."""
import csv
import json

import pytest

import biomedap
import biomedvr
import common
import runner
import data

METHODS = {"biomedap": biomedap, "biomedvr": biomedvr}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Your-own-folder dataset: the synthetic classes as PNG files, with their class text."""
    root = tmp_path_factory.mktemp("own") / "shapes"
    for label, name in enumerate(data.SYNTHETIC_LOOKS):
        (root / name.replace(" ", "_")).mkdir(parents=True)
        for i in range(10):
            data.draw_synthetic(f"synthetic:own:{4 * i + label}:48").save(root / name.replace(" ", "_") / f"{i}.png")
    (root / "prompts.json").write_text(json.dumps(data.synthetic_class_text()))
    return root


@pytest.mark.parametrize("name", METHODS)
def test_predict_matches_the_runs_own_evaluation(name, folder, tmp_path, capsys):
    module, out = METHODS[name], tmp_path / "runs"
    argv = ["--dataset", str(folder), "--backbone", "tiny", "--shots", "2", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--out", str(out)]
    metrics = runner.run_method(module, argv=argv)
    run_dir = runner.run_dir(str(out), name, str(folder), 2, 1, backbone="tiny")
    test = data.load_splits(str(folder)).test
    capsys.readouterr()
    csv_path = tmp_path / "predictions.csv"
    rows = runner.run_method(module, argv=["--predict", str(run_dir), *[t.path for t in test],
                                                            "--predictions", str(csv_path), "--device", "cpu"])
    classnames = data.load_splits(str(folder)).classnames
    confusion = [[0] * len(classnames) for _ in classnames]
    for item, row in zip(test, rows):
        confusion[item.label][classnames.index(row["predicted"])] += 1
    assert confusion == metrics["test"]["confusion_matrix"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{test[0].path}: {rows[0]['predicted']} ") and printed[0].count(",") >= 2
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert [r["predicted"] for r in written] == [r["predicted"] for r in rows]
    assert abs(sum(float(written[0][f"p({c})"]) for c in classnames) - 1) < 1e-4
    if name == "biomedvr":
        assert {"positive_expert", "negative_expert", "gate"} <= set(written[0])
        assert written[0]["gate"] == "/".join(f"{g:.3f}" for g in metrics["gate"])


def test_load_run_is_importable_and_takes_a_folder_of_images(folder, tmp_path, capsys):
    out = tmp_path / "runs"
    runner.run_method(biomedvr, argv=[
        "--dataset", str(folder), "--backbone", "tiny", "--shots", "2", "--epochs", "1", "--workers", "0",
        "--device", "cpu", "--out", str(out)])
    predictor = runner.load_run(biomedvr, runner.run_dir(str(out), "biomedvr", str(folder), 2, 1, backbone="tiny"))
    images = data.find_images([folder / "red_disc"])
    result = predictor(images)
    assert result["probabilities"].shape == (10, 4) and len(result["positive_expert"]) == 10
    run = runner.run_dir(str(out), "biomedvr", str(folder), 2, 1, backbone="tiny")
    with pytest.raises(common.UserError, match="holds a biomedvr run, not a biomedap one: read it with python biomedvr.py"):
        runner.load_run(biomedap, run)
    for argv in (["--eval-only", str(run)], ["--predict", str(run), str(folder / "red_disc")]):
        with pytest.raises(SystemExit) as stop:
            runner.run_method(biomedap, argv=argv + ["--device", "cpu"])
        assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert len(err) == 2 and all(line.startswith("error: ") and "python biomedvr.py" in line and len(line) < 400
                                 for line in err)
    with pytest.raises(common.UserError, match="neither an image file nor a folder"):
        data.find_images([tmp_path / "missing.png"])
