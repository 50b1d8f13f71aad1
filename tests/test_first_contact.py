"""What a newcomer checks first: the zero-shot baseline comparable with the published one (the
"a photo of a {}." scoring, base-to-novel, the published means in the summary), a fewshot.png
where every series stays visible, and one line naming the script that reads a run."""
import json

import pytest

import common
import report
import runner
import zeroshot
from common import harmonic_mean


def test_zeroshot_base_to_novel_gives_base_novel_and_their_harmonic_mean(backbones, tmp_path, monkeypatch):
    bb = backbones("tiny")
    monkeypatch.setattr(common, "load_backbone", lambda name, device: bb)
    args = zeroshot.Args(dataset="synthetic", backbone="tiny", device="cpu", out=str(tmp_path), workers=0,
                         subsample="base")
    metrics = zeroshot.main(args)
    folder = tmp_path / "tiny" / "zeroshot" / "synthetic" / "0shot_base2novel" / "seed1"
    record = json.loads((folder / "metrics.json").read_text())
    for scoring in ("photo_template", "clinical_template", "descriptions"):
        base, novel = record["metrics"][f"{scoring}_base"], record["metrics"][f"{scoring}_novel"]
        assert len(base["confusion_matrix"]) == 2 and len(novel["confusion_matrix"]) == 2  # 4 classes: 2 + 2
        assert record["metrics"][f"{scoring}_hm"] == pytest.approx(harmonic_mean(base["accuracy"], novel["accuracy"]))
    assert metrics.keys() == record["metrics"].keys()
    # the summary reads it as a zero-shot base-to-novel row, apart from the full-split protocol
    text = report.summarize(tmp_path)
    assert "zeroshot: base-to-novel zero-shot accuracy" in text
    assert (f"| synthetic | photo_template | 80/80 | {record['metrics']['photo_template_base']['accuracy']:.2f} |"
            in text)  # n: the base and the novel test images


def test_zeroshot_confusion_panels_are_titled_by_their_scoring(backbones, tmp_path, monkeypatch):
    bb = backbones("tiny")
    monkeypatch.setattr(common, "load_backbone", lambda name, device: bb)
    figures = []
    monkeypatch.setattr(runner, "atomic_write_png", lambda fig, path: figures.append(fig))
    zeroshot.main(zeroshot.Args(dataset="synthetic", backbone="tiny", device="cpu", out=str(tmp_path), workers=0))
    titles = [ax.get_title().split(":")[0] for ax in figures[0].axes]
    assert titles == ["photo_template", "clinical_template", "descriptions"]


def fake_zeroshot(root, dataset, photo, base=None):
    runner.atomic_write_json(root / "zeroshot" / dataset / "seed1" / "metrics.json",
                             {"metrics": {"photo_template": {"accuracy": photo},
                                          "clinical_template": {"accuracy": photo + 1}}})
    if base is not None:
        runner.atomic_write_json(root / "zeroshot" / dataset / "0shot_base2novel" / "seed1" / "metrics.json",
                                 {"metrics": {"photo_template_base": {"accuracy": base[0]},
                                              "photo_template_novel": {"accuracy": base[1]},
                                              "clinical_template_base": {"accuracy": base[0]},
                                              "clinical_template_novel": {"accuracy": base[1]}}})


def test_summary_prints_the_published_means_beside_ours_over_the_same_datasets(tmp_path):
    fake_zeroshot(tmp_path, "btmri", 40.0, (50.0, 60.0))
    fake_zeroshot(tmp_path, "busi", 30.0, (10.0, 20.0))        # not in the base-to-novel mean (without BUSI)
    fake_zeroshot(tmp_path, "dermamnist", 90.0, (70.0, 80.0))  # not in the few-shot mean (without DermaMNIST)
    text = report.summarize(tmp_path)
    assert ("ours 35.00 (2 of 10 datasets measured); published 42.38 (CLIP-SVD README, BiomedCLIP zero-shot, "
            "10 datasets without DermaMNIST)") in text
    hm = (harmonic_mean(50, 60) + harmonic_mean(70, 80)) / 2
    assert f"ours base 60.00 novel 70.00 HM {hm:.2f} (2 of 10 datasets measured); published base 47.84 novel " \
           f"65.42 HM 53.81 (BiomedCoOp README" in text


def test_fewshot_png_keeps_series_with_equal_accuracy_apart(tmp_path, monkeypatch):
    for method in ("biomedap", "biomedvr", "biomedap-official"):
        for k in (1, 2):
            runner.atomic_write_json(tmp_path / method / "btmri" / f"{k}shot" / "seed1" / "metrics.json",
                                     {"metrics": {"test": {"accuracy": 50.0}}})
    figures = []
    monkeypatch.setattr(report, "atomic_write_png", lambda fig, path: figures.append(fig))
    report.summarize(tmp_path)
    lines = [container.lines[0] for container in figures[0].axes[0].containers]  # each errorbar's data line
    assert len(lines) == 3
    xs = {tuple(line.get_xdata()) for line in lines}
    markers = {line.get_marker() for line in lines}
    assert len(xs) == 3 and len(markers) == 3  # equal accuracies, yet three distinct places and shapes
