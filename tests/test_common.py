"""common.py: backbone seams (parity with open_clip), text trimming, metrics against
hand-computed values, argument parsing, seeding, run folders, checkpoints, summaries."""
import dataclasses
import json

import pytest
import torch

import common
import report
import runner
from common import UserError


# ------------------------------------------------------------------ backbones and seams
@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_image_seams_match_encode_image(backbones, name):
    bb = backbones(name)
    x = torch.randn(3, 3, bb.image_size, bb.image_size)
    h = bb.image_tokens(x)
    n_patches = (bb.image_size // 8) ** 2
    assert h.shape == (3, 1 + n_patches, bb.image_width)
    for i in range(bb.num_blocks):
        h = bb.image_block(h, i)
    assert (bb.image_head(h) - bb.encode_image(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_text_seams_match_encode_text_and_trimming_is_exact(backbones, name):
    bb = backbones(name)
    texts = ["a photo of a disc.", "a red square with thin stripes on a textured background", "x"]
    padded = bb.tokenizer(texts)                       # (3, context length)
    trimmed = bb.tokenize(texts)
    assert trimmed.shape[1] < padded.shape[1]
    reference = bb.model.encode_text(padded)
    via_seam = bb.text_from_embeddings(bb.token_embedding(trimmed), trimmed)
    assert (via_seam - reference).abs().max() <= 1e-5
    # a prompt method replaces word embeddings: changing one context vector changes the feature
    emb = bb.token_embedding(trimmed).clone()
    emb[:, 1] += torch.randn(emb.shape[-1])  # (not a constant: the embedding LayerNorm would remove it)
    assert (bb.text_from_embeddings(emb, trimmed) - reference).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_backbone_is_frozen_and_in_eval_mode(backbones, name):
    bb = backbones(name)
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert not any(m.training for m in bb.model.modules())
    assert bb.kind == {"tiny": "timm-hf", "tiny-clip": "openclip"}[name]


def test_tiny_vocabulary_is_really_loaded(backbones):
    bb = backbones("tiny")  # transformers 5 silently builds a 5-token vocabulary if vocab.txt is missing
    assert len(bb.tokenizer.tokenizer) == bb.model.text.config.vocab_size > 100
    ids = bb.tokenize(["glioma", "meningioma"])
    assert not torch.equal(ids[0], ids[1])


def test_full_size_biomedclip_architecture_builds_offline():
    bb = common.load_backbone("biomedclip-random")
    assert sum(p.numel() for p in bb.model.parameters()) == 195_902_721
    assert (bb.image_size, bb.num_blocks, bb.image_width, bb.text_width, bb.embed_dim) == (224, 12, 768, 768, 512)
    assert len(bb.tokenizer.tokenizer) == 30522 and bb.tokenizer.context_length == 256


def test_unknown_and_unreachable_backbones_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown backbone 'nope'"):
        common.load_backbone("nope")
    with pytest.raises(UserError, match="local-dir:FOLDER"):  # HF_HUB_OFFLINE=1: the hub cannot be reached
        common.load_backbone("biomedclip")
    with pytest.raises(UserError, match="open_clip_config.json"):
        common.load_backbone(f"local-dir:{tmp_path}")
    with pytest.raises(UserError, match=r"local-dir folder /does/not/exist does not exist"):
        common.load_backbone("local-dir:/does/not/exist")


def test_hub_error_keeps_the_whole_reason_on_one_line(monkeypatch):
    import open_clip
    reason = "first line of a long reason " * 12 + "\n  and the part that matters: repository not found"

    def fail(*a, **k):
        raise OSError(reason)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", lambda *a, **k: "weights")
    monkeypatch.setattr(open_clip, "create_model", fail)
    with pytest.raises(UserError) as error:
        common.load_backbone("hf-hub:org/repo")
    message = str(error.value)
    assert "\n" not in message and "and the part that matters: repository not found)" in message


def test_local_dir_with_an_openai_clip_folder_loads_offline(tmp_path, backbones):
    """The README's offline recipe for OpenAI CLIP: open_clip_config.json + safetensors weights."""
    from safetensors.torch import save_file
    tiny = backbones("tiny-clip")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    cfg = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8,
                                                         "head_width": 32},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2,
                                      "layers": 2}},
           "preprocess_cfg": {"mean": list(common.OPENAI_MEAN), "std": list(common.OPENAI_STD)}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    bb = common.load_backbone(f"local-dir:{tmp_path}")
    x = torch.randn(2, 3, 32, 32)
    assert bb.kind == "openclip" and torch.allclose(bb.encode_image(x), tiny.encode_image(x), atol=1e-6)


def test_local_dir_loads_offline_with_text_config_in_the_folder(tmp_path, backbones):
    """A BiomedCLIP-style folder (open_clip config naming a hub text model, weights, and
    the text model's config.json + vocab.txt) loads without the network."""
    import open_clip
    tiny = backbones("tiny")
    torch.save(tiny.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    tok_dir = tiny.tokenizer.tokenizer.name_or_path
    (tmp_path / "vocab.txt").write_text("\n".join(common._bert_vocab()) + "\n")
    (tmp_path / "config.json").write_text(json.dumps(tiny.model.text.config.to_dict()))
    cfg = {"model_cfg": {"embed_dim": 32,
                         "vision_cfg": {"timm_model_name": common._tiny_vit_name(), "timm_model_pretrained": False,
                                        "timm_pool": "", "timm_proj": "linear", "image_size": 32},
                         "text_cfg": {"hf_model_name": "microsoft/some-hub-model", "hf_tokenizer_name": "x",
                                      "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                      "context_length": 128}},
           "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    bb = common.load_backbone(f"local-dir:{tmp_path}")
    assert bb.mean == (0.5, 0.5, 0.5) and bb.image_size == 32 and tok_dir is not None
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(bb.encode_image(x), tiny.encode_image(x), atol=1e-6)
    assert isinstance(bb.model, open_clip.model.CustomTextCLIP)
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load weights"):
        common.load_backbone(f"local-dir:{tmp_path}")


def test_class_text_features_are_normalised_and_grouped(backbones):
    bb = backbones("tiny")
    groups = [["a disc.", "a round disc."], ["a square."], ["stripes.", "thin stripes.", "red stripes."]]
    feats = common.class_text_features(bb, groups)
    assert [f.shape[0] for f in feats] == [2, 1, 3]
    assert torch.allclose(torch.cat(feats).norm(dim=-1), torch.ones(6), atol=1e-5)
    single = common.encode_sentences(bb, ["a square."])
    assert torch.allclose(feats[1], single, atol=1e-5)
    centroids = common.class_centroids(bb, groups)
    assert centroids.shape == (3, bb.embed_dim)
    logits = common.zero_shot_logits(torch.randn(4, bb.embed_dim), centroids, 100.0)
    assert logits.shape == (4, 3) and logits.abs().max() <= 100.0 + 1e-4


# ------------------------------------------------------------------ metrics
def test_metrics_against_hand_computed_values():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.full((6, 3), -10.0)
    logits[torch.arange(6), preds] = 10.0        # confidence ~1 for every prediction
    m = common.classification_metrics(logits, labels, 3)
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    # recall: 2/3, 1/2, 1 -> balanced accuracy 13/18; precision: 1, 1/2, 1/2
    assert m["balanced_accuracy"] == pytest.approx(100 * 13 / 18)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["macro_f1"] == pytest.approx(100 * sum(f1) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["ece"] == pytest.approx(100 * 2 / 6, abs=1e-3)   # one bin: |4/6 - 1|


def test_ece_uses_15_equal_width_bins():
    # two samples at confidence 0.6 (one right), two at 0.9 (both right)
    p = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 0, 0])
    m = common.classification_metrics(p.log(), labels, 2)
    expected = 0.5 * abs(0.5 - 0.6) + 0.5 * abs(1.0 - 0.9)
    assert m["ece"] == pytest.approx(100 * expected, abs=1e-4)
    assert common.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)


# ------------------------------------------------------------------ arguments, seeding
@dataclasses.dataclass
class _Args:
    dataset: str = runner.arg("btmri", "dataset name")
    shots: int = runner.arg(4, "shots per class")
    lr: float = runner.arg(0.0025, "learning rate")
    variant: str = runner.arg("paper", "variant", choices=["paper", "official"])
    robustness: bool = runner.arg(False, "evaluate perturbed prompts")
    layers: list = dataclasses.field(default_factory=lambda: [5, 8], metadata={"help": "fusion layers"})
    epochs: int | None = runner.arg(None, "epochs (None: the dataset's default)")


def test_parse_args_from_dataclass():
    a = runner.parse_args(_Args, ["--shots", "16", "--variant", "official", "--robustness",
                                  "--layers", "3", "6", "--epochs", "7", "--lr", "0.1"])
    assert (a.shots, a.variant, a.robustness, a.layers, a.epochs, a.lr) == (16, "official", True, [3, 6], 7, 0.1)
    assert runner.parse_args(_Args, []).epochs is None
    with pytest.raises(SystemExit):
        runner.parse_args(_Args, ["--variant", "bogus"])


def test_seeding_repeats_numbers():
    common.seed_everything(3)
    state = runner.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    runner.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    with pytest.raises(UserError, match="bf16 needs a CUDA"):
        common.autocast("bf16", torch.device("cpu"))


# ------------------------------------------------------------------ run folders, checkpoints, summary
def test_run_folder_refuses_to_clobber(tmp_path):
    folder = runner.run_dir(str(tmp_path), "m", "btmri", 4, 1)
    assert folder == tmp_path / "m" / "btmri" / "4shot" / "seed1"
    assert runner.run_dir(str(tmp_path), "m", "btmri", 16, 2, "base").name == "seed2"
    runner.RunFolder(folder, overwrite=False, resume=False)
    runner.save_checkpoint(folder / "checkpoint.pt", {"x": torch.ones(2)})
    with pytest.raises(UserError, match="--resume"):
        runner.RunFolder(folder, overwrite=False, resume=False)
    runner.atomic_write_json(folder / "metrics.json", {"metrics": {}})
    with pytest.raises(UserError, match="--overwrite"):
        runner.RunFolder(folder, overwrite=False, resume=False)
    with pytest.raises(UserError, match="contradict"):
        runner.RunFolder(folder, overwrite=True, resume=True)
    # --overwrite keeps the old run until the new one has a checkpoint, then replaces it whole
    before = (folder / "checkpoint.pt").read_bytes()
    run = runner.RunFolder(folder, overwrite=True, resume=False)
    assert (folder / "metrics.json").exists() and (folder / "checkpoint.pt").read_bytes() == before
    run.save_checkpoint({"x": torch.zeros(3)})
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(runner.load_checkpoint(folder)["x"], torch.zeros(3))
    assert sorted(p.name for p in folder.parent.iterdir()) == [".seed1.lock", "seed1"]  # no staging folder left
    run.close()  # the lock beside the folder goes with the run
    assert sorted(p.name for p in folder.parent.iterdir()) == ["seed1"]


def test_resume_refuses_changes_that_change_the_numbers():
    """Each field says itself whether it may change on --resume: no shared list names a flag."""
    @dataclasses.dataclass
    class A:
        shots: int = runner.arg(4, "shots")
        workers: int = runner.arg(4, "workers", resume_may_differ=True)
        precision: str = runner.arg("fp32", "precision")
        device: str = runner.arg("auto", "device", resume_may_differ=True)
        out: str = runner.arg("runs", "out", resume_may_differ=True)
        robustness: bool = runner.arg(False, "robustness", resume_may_differ=True)
    saved = dataclasses.asdict(A())
    runner.check_resume(saved, A(device="cpu", out="elsewhere", robustness=True, workers=0))  # allowed to differ
    for changed in (A(precision="bf16"), A(shots=8)):
        with pytest.raises(UserError, match="different settings"):
            runner.check_resume(saved, changed)


def test_arguments_are_validated_by_the_range_each_field_declares():
    @dataclasses.dataclass
    class A:
        shots: int = runner.arg(4, "shots", at_least=1)
        epochs: int = runner.arg(None, "epochs", at_least=1)
        seed: int = runner.arg(1, "seed", at_least=0)
        lr: float = runner.arg(0.1, "lr", above=0)
        momentum: float = runner.arg(0.9, "momentum", at_least=0, below=1)
        margin: float = runner.arg(0.5, "margin")
    runner.validate_args(A())
    runner.validate_args(A(margin=-3.0, momentum=0.0))
    for bad in (A(shots=0), A(shots=-1), A(epochs=0), A(epochs=2.5), A(seed=-3)):
        with pytest.raises(UserError, match="must be a whole number"):
            runner.validate_args(bad)
    for bad, message in ((A(lr=0.0), "--lr must be a number > 0"), (A(momentum=1.0), "--momentum must be a number >= 0 and < 1"),
                         (A(margin=float("nan")), "--margin must be a finite number")):
        with pytest.raises(UserError, match=message):
            runner.validate_args(bad)


def test_finished_checkpoint_keeps_only_what_evaluation_needs(tmp_path):
    runner.save_checkpoint(tmp_path / "checkpoint.pt", {
        "trainable": {"w": torch.ones(1000)}, "args": {"a": 1}, "epoch": 2, "optimizer": {"m": torch.ones(1000)},
        "rng": runner.rng_state()})
    full = (tmp_path / "checkpoint.pt").stat().st_size
    runner.finish_checkpoint(tmp_path)
    slim = runner.load_checkpoint(tmp_path)
    assert set(slim) == {"trainable", "args", "epoch"} and (tmp_path / "checkpoint.pt").stat().st_size < full / 2


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    state = {"trainable": {"ctx": torch.randn(4, 8)}, "args": {"shots": 4}, "epoch": 3,
             "rng": runner.rng_state()}
    runner.save_checkpoint(tmp_path / "checkpoint.pt", state)
    back = runner.load_checkpoint(tmp_path)
    assert torch.equal(back["trainable"]["ctx"], state["trainable"]["ctx"]) and back["epoch"] == 3
    runner.set_rng_state(back["rng"])
    with pytest.raises(UserError, match="no checkpoint"):
        runner.load_checkpoint(tmp_path / "missing")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        runner.load_checkpoint(tmp_path / "bad.pt")


def _fake_run(root, method, dataset, shots, seed, metrics, suffix=""):
    runner.atomic_write_json(root / method / dataset / f"{shots}shot{suffix}" / f"seed{seed}" / "metrics.json",
                             {"metrics": metrics})


def test_summary_tables(tmp_path):
    for seed, acc in ((1, 60.0), (2, 70.0)):
        _fake_run(tmp_path, "m", "btmri", 4, seed, {"test": {"accuracy": acc}})
    _fake_run(tmp_path, "m", "busi", 4, 1, {"test": {"accuracy": 90.0}})
    _fake_run(tmp_path, "m", "btmri", 16, 1, {"base": {"accuracy": 80.0}, "novel": {"accuracy": 60.0}},
              "_base2novel")
    _fake_run(tmp_path, "m", "busi", 16, 1, {"base": {"accuracy": 50.0}, "novel": {"accuracy": 100.0}},
              "_base2novel")
    text = report.summarize(tmp_path)
    assert "65.00 ± 7.07 (2)" in text                       # btmri: mean and sample std of 60, 70
    assert "77.50 (2 datasets)" in text                     # average over datasets of the means
    assert "| btmri | 16 | –/– | 80.00 | 60.00 | 68.57 | 70.00 |" in text   # true HM vs arithmetic mean
    assert "average without BUSI** (1)" in text
    # averages: base 65, novel 80 -> true HM of the averages 71.72; per-dataset HMs 68.57, 66.67
    assert "71.72 (mean of per-dataset HM 67.62)" in text
    assert (tmp_path / "summary.md").read_text().strip() == text.strip()
    assert "btmri,4,accuracy,65.0000" in (tmp_path / "summary.csv").read_text()
