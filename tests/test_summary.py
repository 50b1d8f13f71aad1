"""Summaries and pictures: runs found at any depth, folders kept apart, the zero-shot column,
the series behind fewshot.png and base2novel.png, and confusion.png beside metrics.json."""
import json

import numpy as np
import torch
from PIL import Image

import common
import report
import runner


def fake_run(root, folder, method, dataset, shots, seed, metrics, suffix=""):
    path = root / folder / method / dataset / f"{shots}shot{suffix}" / f"seed{seed}" / "metrics.json"
    runner.atomic_write_json(path, {"metrics": metrics})


def fake_zeroshot(root, folder, dataset, template, descriptions):
    path = root / folder / "zeroshot" / dataset / "seed1" / "metrics.json"
    runner.atomic_write_json(path, {"metrics": {"photo_template": {"accuracy": template},
                                                "clinical_template": {"accuracy": template},
                                                "descriptions": {"accuracy": descriptions}}})


def acc(value):
    return {"test": {"accuracy": value}}


def png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_runs_at_any_depth_in_two_folders_are_not_merged(tmp_path, capsys):
    fake_run(tmp_path, "smoke/tiny", "m", "synthetic", 8, 1, acc(30.0))
    fake_run(tmp_path, "smoke/tiny-clip", "m", "synthetic", 8, 1, acc(60.0))
    fake_zeroshot(tmp_path, "smoke/tiny", "synthetic", 25.0, 40.0)
    for seed, value in ((1, 10.0), (2, 20.0)):
        fake_run(tmp_path, "a/b/c", "m", "btmri", 4, seed, acc(value))
    runner.atomic_write_json(tmp_path / "notes" / "metrics.json", {"metrics": {}})  # not a run folder
    text = report.summarize(tmp_path)
    assert text.splitlines()[0] == f"Read 5 runs under {tmp_path}: a/b/c (2), smoke/tiny (2), smoke/tiny-clip (1)"
    assert "## smoke/tiny/m: few-shot" in text and "## smoke/tiny-clip/m: few-shot" in text
    assert "| synthetic | – | 25.00 | 30.00 (1 seed) |" in text     # K=0 from the same folder's zero-shot run
    assert "| synthetic | – | – | 60.00 (1 seed) |" in text         # no zero-shot run in tiny-clip
    assert "45.00" not in text                                     # the two folders' runs never averaged
    assert "## a/b/c/m: few-shot" in text and "| btmri | – | – | 15.00 ± 7.07 (2) |" in text
    assert "## smoke/tiny/zeroshot: zero-shot" in text and "| synthetic | – | 25.00 | 25.00 | 40.00 |" in text
    assert "skipping" in capsys.readouterr().err
    table = (tmp_path / "summary.csv").read_text()
    assert "smoke/tiny,zeroshot,zeroshot,synthetic,0,descriptions_accuracy,40.0000" in table
    assert "smoke/tiny-clip,m,fewshot,synthetic,8,accuracy,60.0000" in table
    width, height = png(tmp_path / "fewshot.png")
    assert width <= 1400 and height <= 1400
    assert not (tmp_path / "base2novel.png").exists()              # no base-to-novel runs
    assert not list(tmp_path.glob("*.tmp"))


def test_fewshot_series_is_the_numbers_of_metrics_json(tmp_path):
    values = {("btmri", 1): (40.0, 50.0), ("btmri", 4): (60.0, 64.0), ("busi", 1): (70.0, 90.0)}
    for (dataset, shots), seeds in values.items():
        for seed, value in enumerate(seeds, start=1):
            fake_run(tmp_path, "", "m", dataset, shots, seed, acc(value))
    fake_zeroshot(tmp_path, "", "btmri", 30.0, 35.0)
    fake_zeroshot(tmp_path, "", "busi", 50.0, 55.0)
    series = report.fewshot_series(report._collect(tmp_path))
    assert set(series) == {"btmri", "busi", "average"}
    assert series["btmri"]["m"] == [(1, 45.0, 40.0, 50.0), (4, 62.0, 60.0, 64.0)]
    assert series["btmri"]["zero-shot"] == [(0, 30.0, 30.0, 30.0)]   # template scoring at K=0
    # average at K=1: per-seed averages (40+70)/2=55 and (50+90)/2=70; K=4 has btmri only
    assert series["average"]["m"] == [(1, 62.5, 55.0, 70.0), (4, 62.0, 60.0, 64.0)]
    assert series["average"]["zero-shot"] == [(0, 40.0, 40.0, 40.0)]
    # the average panel has no spread when its datasets were run with different seeds
    fake_run(tmp_path, "", "m", "busi", 4, 3, acc(80.0))
    series = report.fewshot_series(report._collect(tmp_path))
    assert series["average"]["m"][1] == (4, 71.0, 71.0, 71.0)
    report.summarize(tmp_path)
    png(tmp_path / "fewshot.png")


def test_base2novel_series_and_picture(tmp_path):
    for seed, (base, novel) in enumerate(((80.0, 60.0), (70.0, 50.0)), start=1):
        fake_run(tmp_path, "x", "m", "btmri", 16, seed, {"base": {"accuracy": base}, "novel": {"accuracy": novel}},
                 "_base2novel")
    fake_run(tmp_path, "x", "m", "busi", 16, 1, {"base": {"accuracy": 50.0}, "novel": {"accuracy": 100.0}},
             "_base2novel")
    bars = report.base2novel_series(report._collect(tmp_path))
    hm = common.harmonic_mean
    assert bars == {"x/m": [("btmri K=16", 75.0, 55.0, hm(75.0, 55.0)), ("busi K=16", 50.0, 100.0, hm(50.0, 100.0)),
                            ("average", 62.5, 77.5, hm(62.5, 77.5))]}
    text = report.summarize(tmp_path)
    assert f"| btmri | 16 | –/– | 75.00 | 55.00 | {hm(75.0, 55.0):.2f} |" in text    # the table shows the same numbers
    png(tmp_path / "base2novel.png")
    assert not (tmp_path / "fewshot.png").exists()


def _capture_figure(monkeypatch):
    figures = []
    original = runner.atomic_write_png

    def keep(fig, path):
        figures.append(fig)
        original(fig, path)
    monkeypatch.setattr(runner, "atomic_write_png", keep)
    return figures


def test_write_metrics_draws_confusion_png_with_class_names(tmp_path, monkeypatch):
    figures = _capture_figure(monkeypatch)
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    test = common.classification_metrics(logits, torch.tensor([0, 1, 2]), 3)
    names = ["glioma tumor", "meningioma tumor", "normal brain"]
    runner.write_metrics(tmp_path, {"seed": 1}, {"test": test}, {}, classnames=names)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["test"]["confusion_matrix"] == \
        [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    png(tmp_path / "confusion.png")
    (ax,) = [a for a in figures[0].axes if a.get_title()]
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert [t.get_text() for t in ax.texts] == ["1", "0", "0", "1", "0", "0", "0", "0", "1"]   # counts, row by row
    np.testing.assert_allclose(ax.images[0].get_array(), runner.row_normalised(test["confusion_matrix"]))
    np.testing.assert_allclose(runner.row_normalised([[3, 1], [0, 0]]), [[0.75, 0.25], [0.0, 0.0]])


def test_confusion_png_per_block_and_the_old_call_still_works(tmp_path, monkeypatch):
    figures = _capture_figure(monkeypatch)
    base = common.classification_metrics(torch.eye(3), torch.arange(3), 3)
    novel = common.classification_metrics(torch.eye(2), torch.arange(2), 2)
    metrics = {"base": base, "novel": novel, "harmonic_mean": 100.0}
    runner.write_metrics(tmp_path / "b2n", {}, metrics, {}, classnames={"base": list("abc"), "novel": list("de")})
    axes = [a for a in figures[0].axes if a.get_title()]
    assert [a.get_title().split(":")[0] for a in axes] == ["base", "novel"]
    assert [[t.get_text() for t in a.get_yticklabels()] for a in axes] == [list("abc"), list("de")]
    runner.write_metrics(tmp_path / "plain", {}, {"test": novel}, {})   # no class names: indices
    assert [t.get_text() for t in figures[1].axes[0].get_xticklabels()] == ["0", "1"]
    png(tmp_path / "plain" / "confusion.png")
