"""The zero-shot baseline: `python zeroshot.py` against a direct computation with
open_clip's own towers, its refusal to overwrite, its command line and its run.sh sweep."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import common
import zeroshot
import runner
from common import UserError
from data import build_transform, draw_synthetic, load_splits, synthetic_class_text

REPO = Path(__file__).resolve().parents[1]


def direct_logits(bb, images, sentences_per_class):
    """Zero-shot logits written out with open_clip's padded encode_text and encode_image."""
    with torch.no_grad():
        image = F.normalize(bb.model.encode_image(images), dim=-1)                            # (n, E)
        classes = []
        for sentences in sentences_per_class:
            text = F.normalize(bb.model.encode_text(bb.tokenizer(sentences)), dim=-1)       # (m, E)
            classes.append(F.normalize(text.mean(0), dim=-1))
        return bb.model.logit_scale.exp() * image @ torch.stack(classes).t()               # (n, C)


def test_zeroshot_scores_template_and_descriptions_like_a_direct_computation(backbones, tmp_path, monkeypatch,
                                                                              capsys):
    bb = backbones("tiny")
    monkeypatch.setattr(common, "load_backbone", lambda name, device: bb)
    args = zeroshot.Args(dataset="synthetic", backbone="tiny", device="cpu", out=str(tmp_path), workers=0)
    metrics = zeroshot.main(args)
    folder = tmp_path / "tiny" / "zeroshot" / "synthetic" / "seed1"  # not BiomedCLIP: a backbone folder
    record = json.loads((folder / "metrics.json").read_text())
    assert record["metrics"] == json.loads(json.dumps(metrics))
    assert record["args"]["dataset"] == "synthetic" and "total_s" in record["timings"]
    assert "torch" in record["versions"] and (folder / "confusion.png").stat().st_size > 0

    splits = load_splits("synthetic", image_size=bb.image_size)
    transform = build_transform(bb.image_size, bb.mean, bb.std)
    images = torch.stack([transform(draw_synthetic(item.path)) for item in splits.test])
    labels = torch.tensor([item.label for item in splits.test])
    text = synthetic_class_text()
    names = splits.classnames
    for block, sentences in (("clinical_template", [[text["template"].format(c)] for c in names]),
                             ("photo_template", [[f"a photo of a {c}."] for c in names]),
                             ("descriptions", [text["classes"][c]["descriptions"] for c in names])):
        expected = common.classification_metrics(direct_logits(bb, images, sentences), labels, len(names))
        got = record["metrics"][block]
        assert got["confusion_matrix"] == expected["confusion_matrix"], block
        for key in ("accuracy", "macro_f1", "balanced_accuracy", "ece"):
            assert got[key] == pytest.approx(expected[key], abs=1e-3), (block, key)
    # the two scorings are different class features, not one computed twice
    assert record["metrics"]["clinical_template"]["confusion_matrix"] != \
        record["metrics"]["descriptions"]["confusion_matrix"]
    out = capsys.readouterr().out
    assert f"clinical_template {metrics['clinical_template']['accuracy']:.2f}" in out


def test_zeroshot_refuses_to_overwrite_a_result(tmp_path, monkeypatch):
    folder = tmp_path / "zeroshot" / "synthetic" / "seed1"
    runner.atomic_write_json(folder / "metrics.json", {"metrics": {}})
    monkeypatch.setattr(common, "load_backbone", lambda *a: pytest.fail("refusal must come before any loading"))
    with pytest.raises(UserError, match="--overwrite"):
        zeroshot.main(zeroshot.Args(dataset="synthetic", out=str(tmp_path)))
    assert json.loads((folder / "metrics.json").read_text()) == {"metrics": {}}


def test_zeroshot_command_line_prints_one_line_errors(tmp_path):
    """data.py's errors are `common.UserError`: the CLI must catch those, not a __main__ copy."""
    out = subprocess.run([sys.executable, "zeroshot.py", "--dataset", "no-such-set", "--backbone", "tiny",
                          "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown dataset 'no-such-set'") and len(out.stderr.splitlines()) == 1


def test_run_sh_zeroshot_dry_run_lists_the_missing_datasets(tmp_path):
    runner.atomic_write_json(tmp_path / "zeroshot" / "btmri" / "seed1" / "metrics.json", {"metrics": {}})

    def jobs(*args):
        out = subprocess.run(["bash", str(REPO / "run.sh"), "zeroshot", *args], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "OUT": str(tmp_path)})
        assert out.returncode == 0, out.stderr
        lines = [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]
        assert all(argv[1] == "zeroshot.py" for argv in lines)
        return [runner.parse_args(zeroshot.Args, argv[2:]) for argv in lines]

    runner.atomic_write_json(tmp_path / "local-dir_bc" / "zeroshot" / "btmri" / "seed1" / "metrics.json", {})
    listed = jobs("all", "--dry-run", "--", "--backbone", "local-dir:bc")
    assert [a.dataset for a in listed] == "busi chmnist covid ctkidney dermamnist kneexray kvasir lungcolon " \
                                          "octmnist retina".split()           # btmri is finished
    assert all(a.out == str(tmp_path) and a.backbone == "local-dir:bc" for a in listed)
    assert [a.dataset for a in jobs("btmri,busi", "--dry-run")] == ["busi"]
