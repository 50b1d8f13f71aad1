"""Summaries and pictures: runs found at any depth, folders kept apart, the zero-shot column,
the series behind fewshot.png and base2novel.png, and confusion.png beside metrics.json."""
import json

import numpy as np
import torch
from PIL import Image

import common
import data
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


# ------------------------------------------------------------------ published numbers and ablation tables
def method_run(root, module, acc, extra=None, **settings):
    """A finished run's metrics.json where the method would write it, with its full arguments."""
    import dataclasses
    args = runner.cli_args(module)(**{"out": str(root), **settings})
    blocks = {"test": {"accuracy": acc}} if args.subsample == "all" else {"base": {"accuracy": acc},
                                                                         "novel": {"accuracy": acc - 10}}
    folder = runner.run_folder(module, args)
    runner.atomic_write_json(folder / "metrics.json", {"args": dataclasses.asdict(args), "metrics": {**blocks, **(extra or {})}})
    return folder


def test_published_prints_the_papers_tables_with_sources_and_differences(capsys):
    report.main(["--published"])
    text = capsys.readouterr().out
    for row in ("| BioMedVR | 82.6 | 45.7 | 80.2 | 94.7 | 80.3 | 81.7 | 84.5 | 77.4 | 74.0 | 65.3 | 74.1 | 76.4 |",
                "| AttrVR | 76.0 | 33.6 | 79.5 | 93.8 | 80.4 | 76.2 | 85.4 | 71.0 | 71.6 | 62.1 | 71.5 | 72.8 |",
                "| BiomedAP | 63.57 | 64.89 | 67.92 | 71.21 | 75.09 |", "| BiomedAP | 81.62 | 78.42 | 80.02 |"):
        assert row in text
    for word in ("CoOp", "CoCoOp", "BiomedCoOp", "VP", "AR"):
        assert f"| {word} |" in text
    assert text.count("Source: ") == 3 and text.count("What differs from ours: ") == 3
    assert "79.99" in text and "best test accuracy" in text and "split_liu" in text and "one seed" in text


def test_runs_of_a_published_protocol_show_the_published_figure_and_our_difference(tmp_path):
    import biomedap
    import biomedvr
    table1 = dict(backbone="clip", cs_anchor="fused", shots=16)
    for seed in (1, 2):
        best = {"best_test_accuracy_test_selected": {"accuracy": 80.0 + seed, "epoch": 300}}
        method_run(tmp_path, biomedvr, 70.0 + seed, best, dataset="btmri", seed=seed, **table1)
        method_run(tmp_path / "short", biomedvr, 60.0 + seed, dataset="btmri", seed=seed, **{**table1, "epochs": 5})
        method_run(tmp_path, biomedvr, 66.0 + seed, dataset="btmri", seed=seed, experts="positive", beta=0.0,
                   **table1)
        method_run(tmp_path / "bc", biomedvr, 50.0, dataset="btmri", seed=seed, shots=16, cs_anchor="fused")
    text = report.summarize(tmp_path / "clip")
    # Table 1's protocol: ours last epoch 71.5 and test-selected 81.5 against the published 81.7
    assert "| btmri | 71.50 ± 0.71 (2) | 81.50 | 81.7 | -10.20 | -0.20 |" in text
    assert "| btmri | 67.50 ± 0.71 (2) | – | 76.2 | -8.70 | – |" in text  # the AttrVR row
    assert text.count("**Published beside ours**") == 2
    # 5 epochs is not Table 1's protocol, nor is BiomedCLIP: neither gets a published figure
    assert "Published beside ours" not in report.summarize(tmp_path / "short")
    assert "Published beside ours" not in report.summarize(tmp_path / "bc")  # on BiomedCLIP
    # BiomedAP: a published average is compared once all 11 datasets are in
    ap = tmp_path / "ap"
    for d in data.MEDICAL:
        method_run(ap, biomedap, 75.0, dataset=d, shots=16, seed=1)
        method_run(ap, biomedap, 80.0, dataset=d, shots=16, seed=1, subsample="base")
    method_run(ap, biomedap, 60.0, dataset="btmri", shots=1, seed=1, variant="official")
    text = report.summarize(ap)
    assert "K=16: ours 75.00 over 11 of 11 datasets; published 75.09; ours − published -0.09" in text
    assert "K=1: ours 60.00 over 1 of 11 datasets; published 63.57; no difference" in text
    assert "ours − published: base -1.62 novel -8.42 \"HM\" -5.02" in text


def test_ablation_runs_make_one_table_rows_settings_columns_datasets(tmp_path):
    import biomedap
    import biomedvr
    rows = {(): 70.0, (("beta", 0.0),): 68.0, (("programs", 1),): 67.0, (("gate", "fixed"),): 66.0,
            (("experts", "positive"), ("beta", 0.0)): 64.0}
    for switches, acc in rows.items():
        for i, d in enumerate(("btmri", "busi")):
            method_run(tmp_path, biomedvr, acc + i, dataset=d, shots=16, seed=1, backbone="clip", **dict(switches))
    for switches, acc in (((), 75.0), ((("fusion_layers", ["none"]),), 73.0), ((("low_anchor", "generic"),), 74.0)):
        method_run(tmp_path, biomedap, acc, dataset="btmri", shots=16, seed=1, **dict(switches))
    text = report.summarize(tmp_path)
    table = text.split("## clip/biomedvr: ablations, K=16")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| setting | busi | btmri | average |"
    assert table[2:] == ["| biomedvr (full method) | 71.00 | 70.00 | 70.50 |",
                         "| w/o L_CS (beta 0) | 69.00 | 68.00 | 68.50 |",
                         "| one program for both experts | 68.00 | 67.00 | 67.50 |",
                         "| fixed gate (1/2, 1/2) | 67.00 | 66.00 | 66.50 |",
                         "| w/o negative expert and L_CS (AttrVR) | 65.00 | 64.00 | 64.50 |",
                         "| *AttrVR, published (Table 1)* | 76.0 | 76.2 | 76.10 |"]  # its anchor is irrelevant
    ap = text.split("## biomedap: ablations, K=16")[1].split("\n\n")[1].splitlines()
    assert ap[2:] == ["| biomedap (full method) | 75.00 | 75.00 |", "| w/o fusion (and L_align) | 73.00 | 73.00 |",
                      "| low anchor: generic | 74.00 | 74.00 |"]
    assert report.ablation_row("biomedap-official-fusion3-6-low-empty-no-kl") == (
        "biomedap-official", "fusion at blocks 3-6, low anchor: empty, w/o L_kl", (1, 7, 4))
    assert report.ablation_row("biomedvr-fused-gate-lr1e-05-no-cs")[:2] == ("biomedvr-fused", "gate lr 1e-05, w/o L_CS (beta 0)")
    assert report.ablation_row("zeroshot") is None
