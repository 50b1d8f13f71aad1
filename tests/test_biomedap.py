"""biomedap.py on the tiny random backbones: shapes, gradients, one property per equation,
parameter counts, determinism, resume, and the command line end to end."""
import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import biomedap
import classtext
import common
import runner
from biomedap import (BiomedAP, GatedFusion, alignment_loss, anchor_kl, anchor_l1, confidence_weight,
                      default_fusion_layers, high_anchor, train_step)
from classtext import load_class_text
from common import UserError
from data import CLASSNAMES, synthetic_class_text

BACKBONES = ["tiny", "tiny-clip"]
VARIANTS = ["paper", "official"]
SYNTH = synthetic_class_text()
NAMES = list(SYNTH["classes"])
WEIGHTS = {"lambda_high": 12.5, "lambda_kl": 0.25, "lambda_low": 0.3, "lambda_align": 0.1}
Args = runner.cli_args(biomedap)


def make_model(bb, variant, text=SYNTH, names=NAMES, n_ctx=4, anchors=True, **kw):
    torch.manual_seed(0)
    high = low = None
    if anchors:
        high = high_anchor(bb, [text["classes"][c]["descriptions"][:40] for c in names])
        low = F.normalize(torch.randn(len(names), bb.embed_dim), dim=-1)
    return BiomedAP(bb, names, text["template"], text["ctx_init"], n_ctx, variant,
                    high_anchor=high, low_anchor=low, **kw)


def images_for(bb, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", BACKBONES)
def test_logits_shape_and_finite_losses(backbones, name, variant):
    bb = backbones(name)
    model = make_model(bb, variant)
    x, y = images_for(bb), torch.tensor([0, 1, 2, 3])
    out = model(x, context=model.prompt_learner.class_context()[y])
    assert out["logits"].shape == out["anchor_logits"].shape == (4, len(NAMES))
    assert len(out["fused_text"]) == len(model.fusion_layers) == 2
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    terms, _ = train_step(model, x, y, opt, **WEIGHTS)
    assert all(np.isfinite(v) for v in terms.values()) and terms["loss"] > 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", BACKBONES)
def test_gradients_reach_exactly_the_learnables_and_backbone_is_untouched(backbones, name, variant):
    bb = backbones(name)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    model = make_model(bb, variant)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_roots = {"prompt_learner", "fusion"} | ({"visual_prompts"} if variant == "paper" else set())
    assert {n.split(".")[0] for n in names} == expected_roots
    assert "prompt_learner.ctx" in names
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    train_step(model, images_for(bb), torch.tensor([0, 1, 2, 3]), opt, **WEIGHTS)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.prompt_learner.ctx.grad.abs().sum() > 0
    for k, module in enumerate(model.fusion):  # both branches of every fusion module learn
        assert module.ffn_v[0].weight.grad.abs().sum() > 0 and module.ffn_t[0].weight.grad.abs().sum() > 0, k
    if variant == "paper":
        assert (model.visual_prompts.grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.grad is None for p in bb.model.parameters())
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in bb.model.modules())


@pytest.mark.parametrize("dataset", ["synthetic", "btmri"])
@pytest.mark.parametrize("name", BACKBONES)
def test_prompt_equals_clinical_template_at_init(backbones, name, dataset):
    bb = backbones(name)
    text = SYNTH if dataset == "synthetic" else load_class_text("btmri", CLASSNAMES["btmri"])
    names = list(text["classes"])
    n_ctx = 4 if dataset == "synthetic" else biomedap.OFFICIAL["btmri"][0]
    model = make_model(bb, "paper", text, names, n_ctx, anchors=False)
    reference = F.normalize(bb.encode_text(bb.tokenize([text["template"].format(c) for c in names])), dim=-1)
    assert (model.text_features() - reference).abs().max() <= 1e-5
    with torch.no_grad():  # and the context really is in the prompt
        model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx))
    assert (model.text_features() - reference).abs().max() > 1e-4


def test_template_must_start_with_ctx_init(backbones):
    with pytest.raises(UserError, match="does not start with ctx_init"):
        make_model(backbones("tiny"), "paper", dict(SYNTH, template="the {} photo."), anchors=False)
    with pytest.raises(UserError, match="n_ctx"):
        make_model(backbones("tiny"), "paper", n_ctx=9, anchors=False)


def _fused_visual_tokens(model, x):
    captured = []
    hook = model.fusion[0].register_forward_hook(lambda m, i, o: captured.append(o[0].detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    hook.remove()
    return captured[0]  # (B, P, D)


@pytest.mark.parametrize("name", BACKBONES)
def test_official_fused_tokens_ignore_the_image_and_paper_ones_do_not(backbones, name):
    bb = backbones(name)
    x1, x2 = images_for(bb, 2, seed=1), images_for(bb, 2, seed=2)
    official = make_model(bb, "official")
    a, b = _fused_visual_tokens(official, x1), _fused_visual_tokens(official, x2)
    assert torch.allclose(a, b) and torch.allclose(a, a[:1, :1].expand_as(a))  # same for every image and slot
    paper = make_model(bb, "paper")
    a, b = _fused_visual_tokens(paper, x1), _fused_visual_tokens(paper, x2)
    assert (a - b).abs().max() > 1e-3 and (a[0] - a[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", BACKBONES)
def test_inference_takes_no_labels(backbones, name):
    bb = backbones(name)
    params = inspect.signature(BiomedAP.forward).parameters
    assert not any(p in params for p in ("label", "labels", "y", "target", "targets"))
    model = make_model(bb, "paper").eval()
    x = images_for(bb, 3)
    with torch.no_grad():
        mean = model(x)["logits"]
        model.infer_context = "per-class"
        per_class = model(x)["logits"]
    assert mean.shape == per_class.shape == (3, len(NAMES))
    # a class-shared context: each class's context is the mean, so the two strategies agree
    assert torch.allclose(mean, per_class, atol=1e-5)


def test_fusion_layers_follow_the_relative_depth(backbones):
    assert default_fusion_layers(12) == [5, 8]
    assert default_fusion_layers(24) == [10, 16]
    assert default_fusion_layers(4) == [2, 3]
    model = make_model(backbones("tiny"), "paper", fusion_layers=[0, 3], anchors=False)
    assert model.fusion_layers == [0, 3] and model.prompt_blocks == [0, 1, 2]
    with pytest.raises(UserError):
        make_model(backbones("tiny"), "paper", fusion_layers=[4], anchors=False)


# ------------------------------------------------------------------ losses and anchors
def test_anchor_losses_vanish_at_the_anchors():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(4, 32), dim=-1)
    z = torch.randn(5, 4)
    ctx = torch.randn(5, 3, 16)
    assert anchor_l1(a, a) == 0 and anchor_l1(a, a.flip(0)) > 0
    assert anchor_kl(z, z.clone(), True).abs() < 1e-7 and anchor_kl(z, z.flip(1), True) > 1e-3
    assert alignment_loss([ctx, ctx], ctx).abs() < 1e-6 and alignment_loss([-ctx], ctx) > 1
    # the official KL teacher is not detached: gradient flows into both sides
    t = z.clone().requires_grad_()
    anchor_kl(z.flip(1), t, detach_teacher=False).backward()
    assert t.grad.abs().sum() > 0


def test_confidence_weight_lies_in_one_to_one_plus_alpha():
    torch.manual_seed(0)
    for alpha in (0.5, 1.0):
        w = confidence_weight(torch.randn(8, 5) * 3, alpha)
        assert 1 <= w <= 1 + alpha
        assert torch.isclose(confidence_weight(torch.zeros(8, 5), alpha), torch.tensor(1 + alpha))
        assert confidence_weight(torch.eye(5) * 100, alpha) < 1 + 1e-6
    assert not confidence_weight(torch.randn(4, 3, requires_grad=True), 1.0).requires_grad


def test_high_anchor_is_the_centroid_of_the_first_n_descriptions(backbones):
    bb = backbones("tiny-clip")
    h = high_anchor(bb, [SYNTH["classes"][c]["descriptions"][:3] for c in NAMES])
    first = common.encode_sentences(bb, SYNTH["classes"][NAMES[1]]["descriptions"][:3])
    assert torch.allclose(h[1], F.normalize(first.mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(h.norm(dim=-1), torch.ones(len(NAMES)))


# ------------------------------------------------------------------ parameter counts
def fusion_count(dv, dt):
    du = max(dv, dt)
    attention = 2 * (4 * du * du + 4 * du)  # two MHA at the common width: in (3 du x du) and out proj
    proj = sum((d * du + du) + (du * d + d) for d in (dv, dt) if d < du)  # Linear in and out when narrower
    own = sum((d * d + d) + 2 * d + (8 * d * d + 5 * d) for d in (dv, dt))  # gate, LN, FFN (4x) per stream
    return attention + proj + own


def expected_trainable(variant, depth, dv, dt, n_ctx, layers, p=4):
    visual = (depth - len([i for i in layers if i > 0])) * p * dv if variant == "paper" else 0
    return n_ctx * dt + len(layers) * fusion_count(dv, dt) + visual


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", BACKBONES)
def test_trainable_parameter_count_follows_the_formula(backbones, name, variant):
    bb = backbones(name)
    model = make_model(bb, variant, anchors=False)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == expected_trainable(variant, bb.num_blocks, bb.image_width, bb.text_width, 4, [2, 3])


def test_full_size_fusion_module_has_15_353_856_parameters():
    fusion = GatedFusion(768, 768)
    assert sum(p.numel() for p in fusion.parameters()) == 15_353_856 == fusion_count(768, 768)
    assert fusion.attn_v.num_heads == 8
    # official on BiomedCLIP (BTMRI, n_ctx 5): two fusion modules plus the context
    assert expected_trainable("official", 12, 768, 768, 5, [5, 8]) == 2 * 15_353_856 + 5 * 768
    assert GatedFusion(48, 60).attn_v.num_heads == 6  # fewer heads when 8 does not divide the width
    assert all(isinstance(m, torch.nn.Identity) for m in (fusion.v_in, fusion.t_in, fusion.v_out, fusion.t_out))


def test_fusion_on_unequal_widths_is_the_official_module():
    """OpenAI CLIP (image 768, text 512): only the attentions run at 768; the text stream's gate,
    LayerNorm and FFN stay at 512 (the official count; a module run wholly at 768 has 16,141,568)."""
    fusion = GatedFusion(768, 512)
    assert sum(p.numel() for p in fusion.parameters()) == 13_190_400 == fusion_count(768, 512)
    assert isinstance(fusion.v_in, torch.nn.Identity) and isinstance(fusion.v_out, torch.nn.Identity)
    assert (fusion.t_in.in_features, fusion.t_in.out_features) == (512, 768)
    assert (fusion.t_out.in_features, fusion.t_out.out_features) == (768, 512)
    assert fusion.gate_t.weight.shape == (512, 512) and fusion.norm_t.normalized_shape == (512,)
    assert fusion.ffn_t[0].weight.shape == (2048, 512) and fusion.gate_v.weight.shape == (768, 768)
    # the forward by hand, in the official order: attend at 768, project back, then gate at 512
    small = GatedFusion(16, 8, heads=2, dropout=0.0).eval()
    g = torch.Generator().manual_seed(0)
    p_v, p_t = torch.randn(2, 4, 16, generator=g), torch.randn(2, 3, 8, generator=g)
    out_v, out_t = small(p_v, p_t)
    u_t = small.t_in(p_t)                                                   # (2, 3, 16)
    d_t = small.t_out(small.attn_t(u_t, p_v, p_v)[0])                       # (2, 3, 8)
    gate = torch.sigmoid(small.gate_t(p_t))
    y_t = small.norm_t(p_t + gate * p_t + (1 - gate) * d_t)
    assert out_v.shape == (2, 4, 16) and torch.allclose(out_t, y_t + small.ffn_t(y_t), atol=1e-6)


# ------------------------------------------------------------------ prompt perturbations
@pytest.mark.parametrize("name", BACKBONES)
def test_perturbed_prompts_keep_the_context_and_the_class(backbones, name):
    bb = backbones(name)
    text = load_class_text("btmri", CLASSNAMES["btmri"])
    names = list(text["classes"])
    model = make_model(bb, "paper", text, names, 5, anchors=False)
    pl = model.prompt_learner
    sentences = classtext.perturbed_sentences(text, names)
    ids, embeds = pl.fixed_part(sentences["clinical"])       # clean: exactly the trained prompt
    assert torch.equal(ids, pl.ids) and torch.allclose(model.text_features(embeds, ids), model.text_features())
    ids, _ = pl.fixed_part(sentences["minimal"])             # [start] ctx <class name> [end]
    alone = bb.tokenize(names)
    for c in range(len(names)):
        n = int((alone[c] != bb.pad_id).sum())
        assert torch.equal(ids[c, 1 + 5:1 + 5 + n - 1], alone[c, 1:n])
    ids, _ = pl.fixed_part(sentences["descriptive"])          # the trained prompt, then a description
    assert ids.shape[1] > pl.ids.shape[1] and torch.equal(ids[:, :3], pl.ids[:, :3])


def test_typo_is_deterministic_and_perturbs_about_a_fifth():
    template, ctx = "a MR photo of a {} in the brain.", "a MR photo of a"
    typo = classtext.typo_template(template, ctx)
    assert typo == classtext.typo_template(template, ctx) and typo.startswith(ctx) and "{}" in typo
    changed = sum(a != b for a, b in zip(template, typo))
    assert len(typo) == len(template) and changed == round(0.2 * len("inthebrain."))


# ------------------------------------------------------------------ training and the command line
@pytest.fixture
def run(backbones, monkeypatch, tmp_path):
    """main() on synthetic with the cached tiny backbones; returns (metrics, run folder)."""
    monkeypatch.setattr(common, "load_backbone", lambda name, device: backbones(name))

    def go(**kw):
        base = dict(dataset="synthetic", backbone="tiny", shots=2, epochs=2, workers=0, device="cpu",
                    out=str(tmp_path / "runs"), test_batch_size=80)
        args = Args(**{**base, **kw})
        folder = runner.run_folder(biomedap, args)
        return runner.run(biomedap, args), folder
    return go


def test_training_on_synthetic_beats_chance_by_far(run):
    # Random towers barely separate the class texts, so: tiny-clip, the paper variant
    # (image-dependent prompts), a larger step and a lighter high anchor than the BiomedCLIP
    # defaults (seeds 1-3 reach 71-89%; `official` cannot fit random towers).
    metrics, _ = run(backbone="tiny-clip", shots=8, epochs=20, lr=0.05, lambda_high=1.0)
    assert metrics["test"]["accuracy"] > 50


def test_same_seed_same_metrics_and_resume_matches(run, tmp_path):
    straight, _ = run(epochs=3, out=str(tmp_path / "a"))
    again, _ = run(epochs=3, out=str(tmp_path / "b"))
    assert straight == again
    assert run(epochs=3, out=str(tmp_path / "c"), stop_after_epoch=2)[0] is None
    resumed, folder = run(epochs=3, out=str(tmp_path / "c"), resume=True)
    assert resumed == straight
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 3 and {k.split(".")[0] for k in saved["trainable"]} == {
        "prompt_learner", "visual_prompts", "fusion"}


def test_cli_writes_metrics_refuses_overwrite_and_evaluates_again(run):
    metrics, folder = run(variant="official")
    record = json.loads((folder / "metrics.json").read_text())
    assert folder.parts[-4:] == ("biomedap-official", "synthetic", "2shot", "seed1")
    assert set(record["metrics"]["test"]) >= {"accuracy", "macro_f1", "balanced_accuracy", "ece"}
    assert record["args"]["variant"] == "official" and record["config"]["lambda"]["high"] == 12.5
    with pytest.raises(UserError, match="overwrite"):
        run(variant="official")
    again = runner.run(biomedap, Args(eval_only=str(folder), workers=0, device="cpu", robustness=True))
    assert again["test"] == metrics["test"]
    robust = json.loads((folder / "metrics.json").read_text())["metrics"]["robustness"]
    assert list(robust["accuracy"]) == list(classtext.PERTURBATIONS)
    assert robust["accuracy"]["clinical"] == metrics["test"]["accuracy"]
    assert np.isfinite(robust["mean_drop"])


def test_base_to_novel_and_robustness(run):
    metrics, _ = run(subsample="base", backbone="tiny-clip", robustness=True)
    assert metrics["base"]["n"] == metrics["novel"]["n"] == 80
    assert len(metrics["base"]["confusion_matrix"]) == len(metrics["novel"]["confusion_matrix"]) == 2
    assert metrics["harmonic_mean"] == pytest.approx(
        common.harmonic_mean(metrics["base"]["accuracy"], metrics["novel"]["accuracy"]))
    assert set(metrics["robustness"]["accuracy"]) == set(classtext.PERTURBATIONS)


def test_official_dataset_layout_runs_end_to_end(run, tmp_path):
    root, rng = tmp_path / "data", np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSNAMES["btmri"]):
        folder = root / "BTMRI" / "BTMRI" / name.replace(" ", "_")
        folder.mkdir(parents=True)
        for i, part in enumerate(["train", "train", "val", "test", "test"]):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            split[part].append([f"{folder.name}/{i}.png", label, name])
    (root / "BTMRI" / "split_BTMRI.json").write_text(json.dumps(split))
    metrics, folder = run(dataset="btmri", root=str(root), shots=1, epochs=1)
    assert metrics["test"]["n"] == 8 and (folder / "metrics.json").is_file()
    record = json.loads((folder / "metrics.json").read_text())
    assert record["config"]["n_ctx"] == 5 and record["config"]["lambda"]["low"] == 3.0


# ------------------------------------------------------------------ the ablation switches
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_fusion_trains_no_fusion_module_and_drops_the_alignment_term(backbones, variant):
    bb = backbones("tiny")
    full, bare = make_model(bb, variant), make_model(bb, variant, fusion_layers=[])
    assert full.fusion_layers == default_fusion_layers(bb.num_blocks) and bare.fusion_layers == []
    trained = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert not any(n.startswith("fusion") for n in trained(bare)) and any(n.startswith("fusion") for n in trained(full))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(bare) == expected_trainable(variant, bb.num_blocks, bb.image_width, bb.text_width, 4, [])
    assert count(bare) < count(full)
    if variant == "paper":  # every block then owns its deep prompt
        assert bare.prompt_blocks == list(range(bb.num_blocks))
    x, y = images_for(bb), torch.tensor([0, 1, 2, 3])
    out = bare(x, context=bare.prompt_learner.class_context()[y])
    assert out["fused_text"] == []
    terms = biomedap.biomedap_loss(out, y, bare.high_anchor, bare.low_anchor, variant, **WEIGHTS)
    assert "align" not in terms and {"ce", "high", "low", "kl"} <= set(terms)
    pulls = terms["high"] + terms["low"] + terms["kl"]
    expected = terms["ce"] + (terms["w"] * pulls if variant == "paper" else pulls)
    assert torch.allclose(terms["loss"], expected)
    assert "align" in biomedap.biomedap_loss(full(x, context=full.prompt_learner.class_context()[y]), y,
                                             full.high_anchor, full.low_anchor, variant, **WEIGHTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_confidence_weight_scales_the_alignment_term_in_the_paper_variant_only(backbones, variant):
    """Figure 2 routes L_align into the confidence-aware loss with the anchor and KL terms."""
    bb = backbones("tiny-clip")
    model = make_model(bb, variant)
    y = torch.tensor([0, 1, 2, 3])
    out = model(images_for(bb), context=model.prompt_learner.class_context()[y])
    terms = biomedap.biomedap_loss(out, y, model.high_anchor, model.low_anchor, variant, **WEIGHTS)
    assert terms["align"] > 0
    pulls = terms["high"] + terms["low"] + terms["kl"] + terms["align"]
    if variant == "paper":
        assert terms["w"] > 1.01
        assert torch.allclose(terms["loss"], terms["ce"] + terms["w"] * pulls)
    else:
        assert terms["w"] == 1 and torch.allclose(terms["loss"], terms["ce"] + pulls)
    # alpha 0 removes the weight: every term counts once
    plain = biomedap.biomedap_loss(out, y, model.high_anchor, model.low_anchor, variant, **WEIGHTS, alpha=0.0)
    assert torch.allclose(plain["loss"], terms["ce"] + pulls)


@pytest.mark.parametrize("form, text", [("minimal", "{}"), ("article", "a {}"), ("generic", "a photo of {}"),
                                        ("medical", "a medical image of {}"), ("empty", "X")])
def test_every_low_anchor_form_is_the_released_text_and_the_default_follows_the_variant(backbones, form, text):
    bb = backbones("tiny-clip")
    support = [(images_for(bb, 4), torch.tensor([0, 1, 2, 3]))]
    built = {}
    for variant, low in (("paper", form), ("official", form), ("paper", None), ("official", None)):
        args = Args(dataset="synthetic", backbone="tiny-clip", variant=variant, low_anchor=low)
        cfg = biomedap.configure(args, bb, SYNTH)
        built[variant, low] = (cfg["low_anchor"], biomedap.build(bb, NAMES, SYNTH, cfg, args, support).low_anchor)
    expected = F.normalize(bb.encode_text(bb.tokenize([text.format(c) for c in NAMES])).float(), dim=-1)
    for variant in VARIANTS:  # independent of --variant
        assert built[variant, form][0] == form and (built[variant, form][1] - expected).abs().max() < 1e-5
    assert built["official", None][0] == "minimal" and built["paper", None][0] == "prototypes"
    assert torch.allclose(built["paper", None][1], biomedap.prototype_anchor(bb, support, len(NAMES)))
    if form == "empty":  # one text, "X", for every class
        assert torch.allclose(expected, expected[:1].expand_as(expected))


def test_ablation_switches_are_flags_with_their_rules_and_own_run_folders():
    parse = lambda *argv: runner.parse_args(biomedap, ["--dataset", "synthetic", *argv])  # noqa: E731
    assert parse("--fusion-layers", "none").fusion_layers == ["none"]
    assert parse("--fusion-layers", "3", "6").fusion_layers == [3, 6] and parse().fusion_layers == []
    for argv, message in ((["--fusion-layers", "none", "5"], "alone"),
                          (["--fusion-layers", "none", "--lambda-align", "0.2"], "nothing|no fusion")):
        with pytest.raises(UserError, match=message):
            runner.validate_args(parse(*argv))
    runner.validate_args(parse("--fusion-layers", "none", "--lambda-align", "0"))
    names = {biomedap.run_name(parse(*argv)) for argv in (
        [], ["--fusion-layers", "none"], ["--fusion-layers", "3", "6"], ["--low-anchor", "generic"],
        ["--lambda-high", "0"], ["--lambda-low", "0"], ["--lambda-kl", "0"], ["--lambda-align", "0"],
        ["--alpha", "0"], ["--variant", "official"], ["--variant", "official", "--low-anchor", "prototypes"])}
    assert len(names) == 11 and "biomedap" in names and "biomedap-official-low-prototypes" in names
    # a default given explicitly is no ablation: the full method's folder
    assert biomedap.run_name(parse("--low-anchor", "prototypes", "--lambda-high", "12.5", "--alpha", "1")) == "biomedap"
    assert biomedap.run_name(parse("--variant", "official", "--low-anchor", "minimal")) == "biomedap-official"


def test_no_fusion_trains_fewer_parameters_and_a_text_low_anchor_trains(run, tmp_path):
    full, full_folder = run(out=str(tmp_path / "a"))
    bare, folder = run(out=str(tmp_path / "a"), fusion_layers=["none"], low_anchor="generic")
    assert folder.parts[-4] == "biomedap-no-fusion-low-generic" and full_folder.parts[-4] == "biomedap"
    record, full_record = (json.loads((f / "metrics.json").read_text()) for f in (folder, full_folder))
    assert record["trainable_parameters"] < full_record["trainable_parameters"]
    assert record["config"]["fusion_layers"] == [] and record["config"]["lambda"]["align"] == 0
    assert record["config"]["low_anchor"] == "generic" and full_record["config"]["low_anchor"] == "prototypes"
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)["trainable"]
    assert not any(k.startswith("fusion") for k in saved) and 0 <= bare["test"]["accuracy"] <= 100
