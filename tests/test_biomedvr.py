"""biomedvr.py: the padding programs, the attribute banks and their sampling rule, the expert
scores and both confusion-suppression anchors against hand-computed values, what a training
step touches (and what it must not), learning, determinism, exact resume, and the CLI."""
import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import biomedvr as bv
import classtext
import common
import runner
import data
from common import UserError

FAST = dict(dataset="synthetic", backbone="tiny-clip", frame=4, shots=4, epochs=3, lr=5.0,
            batch_size=8, workers=0)  # tiny backbones take 32-pixel images: a 4-pixel frame


def small_banks(m=4, C=3, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: F.normalize(torch.randn(m, C, E, generator=g), dim=-1) for f in bv.ATTRIBUTE_SETS}


def tiny_model(backbones, name, seed=1, classnames=None):
    bb = backbones(name)
    classnames = classnames or list(data.SYNTHETIC_LOOKS)
    args = runner.cli_args(bv)(**{**FAST, "backbone": name, "seed": seed})
    text = classtext.load_class_text("synthetic", classnames)
    return bb, args, bv.build(bb, classnames, text, bv.configure(args, bb, text), args)


# ------------------------------------------------------------------ programs
def test_program_changes_only_the_frame():
    S, w = 20, 3
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = bv.BioMedVR(S, w, mean, std, small_banks(), 10.0, 2)
    with torch.no_grad():
        model.delta_plus.normal_()
        model.delta_minus.normal_()
    x = torch.rand(2, 3, S - 2 * w, S - 2 * w)
    out = model.reprogram(x)  # (2B, 3, S, S)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    assert out.shape == (4, 3, S, S)
    for half, delta in ((out[:2], model.delta_plus), (out[2:], model.delta_minus)):
        assert torch.allclose(half[:, :, w:S - w, w:S - w], (x - m) / s, atol=1e-6)  # centre untouched
        frame = half * s + m  # back to pixels: the frame is sigmoid(delta) exactly
        assert torch.allclose(frame[:, :, :w], delta.sigmoid()[:, :w].expand(2, -1, -1, -1), atol=1e-6)
        assert torch.allclose(frame[:, :, :, -w:], delta.sigmoid()[:, :, -w:].expand(2, -1, -1, -1), atol=1e-6)
    # only the frame entries get gradient
    out.sum().backward()
    assert model.delta_plus.grad[:, w:S - w, w:S - w].abs().max() == 0
    assert (model.delta_plus.grad[:, :w] != 0).all() and (model.delta_minus.grad[:, :, :w] != 0).all()


def test_parameter_count_is_301058_at_224():
    S = 224
    model = bv.BioMedVR(S, 16, common.OPENAI_MEAN, common.OPENAI_STD, small_banks(m=3, C=2, E=4), 100.0, 3)
    names = {n: p.numel() for n, p in model.named_parameters()}
    assert set(names) == {"delta_plus", "delta_minus", "gate"}
    assert sum(names.values()) == 2 * 3 * S * S + 2 == 301_058
    assert int(model.mask.sum()) * 3 == 3 * (224 ** 2 - 192 ** 2) == 39_936  # effective per program
    assert model.gate.tolist() == [1.0, 1.0]  # the logits themselves start at (1, 1), as official
    other = bv.BioMedVR(S, 16, common.OPENAI_MEAN, common.OPENAI_STD, small_banks(m=3, C=2, E=4), 100.0, 3,
                        gate_init=0.25)
    assert other.gate.tolist() == [0.25, 0.25]


# ------------------------------------------------------------------ text side
def test_attribute_sampling_rule_and_seed():
    long = [f"sentence number {i:02d} is long enough" for i in range(25)]
    short = ["too short", "tiny"]
    got = bv.sample_attributes(long + short, 20, random.Random(1))
    assert len(got) == 20 and len(set(got)) == 20 and not set(got) & set(short)  # without replacement
    few = bv.sample_attributes(long[:5] + short, 20, random.Random(1))
    assert len(few) == 20 and set(few) == set(long[:5])  # with replacement, short ones dropped
    assert few == bv.sample_attributes(long[:5] + short, 20, random.Random(1))
    rng = random.Random(1)  # exactly the released rule: random.sample / random.choices
    assert got == rng.sample(long, 20)
    with pytest.raises(UserError, match="at least 20 characters"):
        bv.sample_attributes(short, 20, random.Random(1))


@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_attribute_banks_are_frozen_buffers_reproducible_from_the_seed(backbones, name):
    bb, args, model = tiny_model(backbones, name)
    C = len(data.SYNTHETIC_LOOKS)
    for field in bv.ATTRIBUTE_SETS:
        bank = getattr(model, field)
        assert bank.shape == (args.num_attr, C, bb.embed_dim) and not bank.requires_grad
        assert torch.allclose(bank.norm(dim=-1), torch.ones(args.num_attr, C), atol=1e-5)
        assert field in dict(model.named_buffers())
    _, _, again = tiny_model(backbones, name)
    assert all(torch.equal(getattr(model, f), getattr(again, f)) for f in bv.ATTRIBUTE_SETS)
    # the bank holds the features of the sentences drawn by the seeded rule, class by class
    text = classtext.load_class_text("synthetic", list(data.SYNTHETIC_LOOKS))
    rng = random.Random(args.seed)
    drawn = [bv.sample_attributes(text["classes"][c]["descriptions"], args.num_attr, rng)
             for c in data.SYNTHETIC_LOOKS]
    expect = common.encode_sentences(bb, drawn[2])  # (m, E) of class 2
    assert torch.allclose(model.descriptions[:, 2], expect, atol=1e-5)


# ------------------------------------------------------------------ scores and losses
def test_topk_score_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, E=2)
    cos = torch.tensor([0.9, 0.1, -0.5, 0.6])  # 4 attributes of class 0 against z[0]
    bank = torch.zeros(4, 2, 2)  # (m=4, C=2, E=2)
    bank[:, 0, 0], bank[:, 0, 1] = cos, (1 - cos ** 2).sqrt()
    bank[:, 1, 1] = 1.0  # class 1: all attributes along the second axis
    s = bv.topk_score(z, bank, logit_scale=10.0, k=2)  # (B, C)
    assert torch.allclose(s[0], torch.tensor([10 * (0.9 + 0.6) / 2, 0.0]), atol=1e-5)
    second = (1 - cos ** 2).sqrt().sort(descending=True).values[:2].mean() * 10
    assert torch.allclose(s[1], torch.stack([second, torch.tensor(10.0)]), atol=1e-5)


def test_confusion_suppression_loss_hand_computed_with_both_anchors():
    s_minus = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.5]])
    s_plus = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0])
    # row 0: relu(3 - 2 + 0.5) = 1.5; row 1: relu(2 - 5 + 0.5) = 0
    loss = bv.confusion_suppression_loss(s_minus, s_plus, labels, margin=0.5)
    assert loss.item() == pytest.approx(0.75)

    class Fixed(torch.nn.Module):  # a model whose outputs we choose
        def forward(self, images):
            g = torch.tensor([0.25, 0.75])
            return {"s_plus": s_plus, "s_minus": s_minus, "gate": g, "logits": g[0] * s_plus + g[1] * s_minus}

    args = runner.cli_args(bv)(beta=0.3, margin=0.5)
    fused = 0.25 * s_plus + 0.75 * s_minus  # fused logit of y: row 0 2.75, row 1 2.75
    ce = F.cross_entropy(fused, labels)
    positive = bv.biomedvr_loss(Fixed()(None), labels, **bv.loss_options(replace(args, cs_anchor="positive")))
    assert positive["cs"].item() == pytest.approx(0.75)
    assert positive["loss"].item() == pytest.approx(ce.item() + 0.3 * 0.75)
    # fused anchor: row 0 relu(3 - 2.75 + 0.5) = 0.75, row 1 relu(2 - 2.75 + 0.5) = 0
    fused_out = bv.biomedvr_loss(Fixed()(None), labels, **bv.loss_options(replace(args, cs_anchor="fused")))
    assert fused_out["cs"].item() == pytest.approx(0.375)
    assert fused_out["loss"].item() == pytest.approx(ce.item() + 0.3 * 0.375)


def attribute_bank(x, y):
    """(m, C, 3) unit vectors with the given components along e1 (x) and e2 (y), per class."""
    x, y = torch.tensor(x).t(), torch.tensor(y).t()  # (C, m) -> (m, C)
    return torch.stack([x, y, (1 - x ** 2 - y ** 2).sqrt()], dim=-1)  # (m, C, 3)


def test_experts_score_their_own_attributes_on_their_own_program_hand_computed():
    """s+ = (Des + Dist) / 2 on the delta+ image, s- = Conf on the delta- image, both with the
    model's k. The image tower here returns the (normalised) top-left frame pixel, so delta+ is
    seen as e1 and delta- as e2; each bank has distinct components along e1 and e2, so scoring the
    wrong image, the wrong banks or with another k gives other numbers."""
    banks = {"descriptions": attribute_bank([[0.9, 0.5, 0.1], [0.2, 0.3, -0.1]], [[0.1, 0.2, 0.3], [0.6, 0.1, 0.0]]),
             "distinctive": attribute_bank([[0.1, 0.0, 0.3], [0.8, 0.6, 0.4]], [[0.0, 0.5, 0.2], [0.1, 0.1, 0.1]]),
             "confusions": attribute_bank([[0.5, 0.1, 0.2], [0.0, 0.3, 0.1]], [[0.4, 0.2, 0.0], [0.9, -0.3, 0.1]])}
    model = bv.BioMedVR(8, 2, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), banks, logit_scale=10.0, topk=2,
                        image_tower=lambda x: x[:, :, 0, 0])  # (2B, 3): sigmoid(delta) - 0.5 at the corner
    with torch.no_grad():
        model.delta_plus[:, 0, 0] = torch.tensor([20.0, 0.0, 0.0])   # corner (0.5, 0, 0): z+ = e1
        model.delta_minus[:, 0, 0] = torch.tensor([0.0, 20.0, 0.0])  # corner (0, 0.5, 0): z- = e2
    out = model(torch.rand(2, 3, 4, 4))
    # Des on e1: class 0 top-2 of (.9 .5 .1) -> 7.0, class 1 of (.2 .3 -.1) -> 2.5
    # Dist on e1: class 0 (.1 0 .3) -> 2.0, class 1 (.8 .6 .4) -> 7.0; s+ = mean of the two
    assert torch.allclose(out["s_plus"], torch.tensor([[4.5, 4.75]] * 2), atol=1e-5)
    # Conf on e2: class 0 (.4 .2 0) -> 3.0, class 1 (.9 -.3 .1) -> 5.0
    assert torch.allclose(out["s_minus"], torch.tensor([[3.0, 5.0]] * 2), atol=1e-5)
    assert torch.allclose(out["logits"], torch.tensor([[3.75, 4.875]] * 2), atol=1e-5)  # gate (1/2, 1/2)


def test_each_expert_loss_reaches_only_its_own_program(backbones):
    bb, args, model = tiny_model(backbones, "tiny-clip")
    out = model(torch.rand(3, 3, 24, 24))
    programs = [model.delta_plus, model.delta_minus, model.gate]
    for score, own in (("s_plus", 0), ("s_minus", 1)):
        grads = torch.autograd.grad(out[score].sum(), programs, retain_graph=True, allow_unused=True)
        for i, grad in enumerate(grads):
            reached = grad is not None and grad.abs().sum() > 0
            assert reached == (i == own), (score, i)
    g_plus, g_minus, g_gate = torch.autograd.grad(out["logits"].sum(), programs)
    assert g_plus.abs().sum() > 0 and g_minus.abs().sum() > 0 and g_gate.abs().sum() > 0


def test_fused_logits_are_the_gated_sum_of_the_experts(backbones):
    bb, args, model = tiny_model(backbones, "tiny-clip")
    with torch.no_grad():
        model.gate.copy_(torch.tensor([0.3, -1.0]))
    out = model(torch.rand(3, 3, 24, 24))
    g = torch.tensor([0.3, -1.0]).softmax(0)
    assert out["logits"].shape == (3, 4)
    assert torch.allclose(out["logits"], g[0] * out["s_plus"] + g[1] * out["s_minus"], atol=1e-5)


# ------------------------------------------------------------------ a training step
@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_training_step_touches_only_programs_and_gate(backbones, name, monkeypatch):
    bb, args, model = tiny_model(backbones, name)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    params = dict(model.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}

    def forbidden(*a, **k):
        raise AssertionError("the text tower ran during a training step")
    monkeypatch.setattr(bb, "encode_text", forbidden)
    monkeypatch.setattr(bb.model, "encode_text", forbidden)
    text_tower = bb.model.text if bb.kind == "timm-hf" else bb.model.transformer
    calls = []
    hooks = [text_tower.register_forward_pre_hook(lambda *a: forbidden()),
             bb.model.visual.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))]
    seen = []  # each step's losses, to check the epoch's averages
    compute = bv.biomedvr_loss
    monkeypatch.setattr(bv, "biomedvr_loss", lambda *a, **k: seen.append(compute(*a, **k)) or seen[-1])
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
        batches = [(torch.rand(3, 3, 24, 24), torch.tensor([0, 1, 2])), (torch.rand(2, 3, 24, 24), torch.tensor([3, 2]))]
        stats = bv.train_one_epoch(model, batches, optimizer, scheduler, torch.device("cpu"), **bv.loss_options(args))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [6, 4]  # one image-tower call per step, on both programs' 2B images
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(not torch.equal(start[k], params[k]) for k in params)  # delta+, delta-, gate all moved
    assert all(p.grad is None and not p.requires_grad for p in bb.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
    for term in ("ce", "cs"):  # per-image averages over the epoch: batches of 3 and 2
        assert stats[term] == pytest.approx((3 * seen[0][term].item() + 2 * seen[1][term].item()) / 5)


# ------------------------------------------------------------------ the released training pipeline
def test_training_transform_is_the_released_one():
    """Resize the shorter side to S-2w, RandomResizedCrop(S-2w), flip (bicubic): the crop is taken
    of the resized image, so the same random draws give the same pixels as the released Compose."""
    args = runner.cli_args(bv)(**FAST)
    transform = bv.transforms_for(args, runner.common.load_backbone("tiny-clip"))[0]  # 32 - 2 * 4 = 24
    released = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomResizedCrop(24, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor()])
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (160, 240, 3), dtype=np.uint8))
    for seed in range(4):
        torch.manual_seed(seed)
        ours = transform(image)
        torch.manual_seed(seed)
        assert torch.equal(ours, released(image))


def test_every_training_image_is_used_every_epoch():
    """The released loader keeps the last partial batch: 16 images in batches of 6 are 3 steps."""
    args = runner.cli_args(bv)(**{**FAST, "batch_size": 6})
    s = runner.setup(bv, args, "cpu")
    loader = runner.make_loaders(bv, s.train.train, s.transforms[0], s.cfg, args, train=True)
    sizes = [len(labels) for _, labels in loader]
    assert len(s.train.train) == 16 and sizes == [6, 6, 4] and len(loader) == 3


def test_learning_rate_follows_the_cosine_over_epochs_times_steps():
    """SGD (momentum 0.9, no weight decay) on the programs and the gate; after one epoch of 5 steps
    out of 4 epochs the rate is lr (1 + cos(pi / 4)) / 2, and 0 after the last step."""
    model = bv.BioMedVR(8, 2, (0.5,) * 3, (0.25,) * 3, small_banks(), 10.0, 2)
    optimizer, scheduler = bv.make_optimizer(model, epochs=4, steps_per_epoch=5, lr=40.0)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert [p for p in group["params"]] == [model.delta_plus, model.delta_minus, model.gate]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(40 * (1 + math.cos(math.pi / 4)) / 2)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_a_run_steps_over_every_image_and_anneals_over_all_its_steps(tmp_path):
    """main() end to end: 16 images in batches of 6 are 3 steps an epoch, so after epoch 1 of 3
    the scheduler has taken 3 of 9 steps and the rate is lr (1 + cos(pi / 3)) / 2."""
    run(tmp_path, batch_size=6, stop_after_epoch=1)
    ckpt = runner.load_checkpoint(runner.run_dir(str(tmp_path / "runs"), "biomedvr", "synthetic", 4, 1, backbone="tiny-clip"))
    assert ckpt["scheduler"]["last_epoch"] == 3 and ckpt["scheduler"]["T_max"] == 9
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(FAST["lr"] * (1 + math.cos(math.pi / 3)) / 2)


# ------------------------------------------------------------------ end to end
def run(tmp_path, **over):
    return runner.run(bv, runner.cli_args(bv)(**{**FAST, "out": str(tmp_path / "runs"), **over}))


def test_training_raises_test_accuracy_well_above_chance(tmp_path, backbones):
    args = runner.cli_args(bv)(**{**FAST, "shots": 16, "epochs": 30, "lr": 8.0, "batch_size": 32, "out": str(tmp_path)})
    s = runner.setup(bv, args, "cpu")
    test = runner.make_loaders(bv, s.evals["test"].test, s.transforms[1], s.cfg, args, train=False)
    untrained = bv.evaluate(s.model, test, "cpu")["accuracy"]
    trained = runner.run(bv, args)["test"]["accuracy"]
    assert untrained < 30 and trained > 45 and trained > untrained + 20  # 4 classes: chance is 25


def test_same_seed_same_metrics_and_resume_is_exact(tmp_path):
    full = run(tmp_path / "a")
    again = run(tmp_path / "b")
    assert again["test"] == full["test"] and again["gate"] == full["gate"]
    assert run(tmp_path / "c", stop_after_epoch=2) is None
    folder = runner.run_dir(str(tmp_path / "c" / "runs"), "biomedvr", "synthetic", 4, 1, backbone="tiny-clip")
    assert not (folder / "metrics.json").exists() and runner.load_checkpoint(folder)["epoch"] == 2
    resumed = run(tmp_path / "c", resume=True)
    assert resumed["test"] == full["test"] and resumed["gate"] == full["gate"]
    a = runner.load_checkpoint(runner.run_dir(str(tmp_path / "a" / "runs"), "biomedvr", "synthetic", 4, 1, backbone="tiny-clip"))
    c = runner.load_checkpoint(folder)
    assert a["epoch"] == c["epoch"] == 3
    assert all(torch.equal(a["trainable"][k], c["trainable"][k]) for k in ("delta_plus", "delta_minus", "gate"))
    other = run(tmp_path / "d", seed=2)
    assert other["test"] != full["test"] or other["gate"] != full["gate"]


def test_cli_writes_metrics_refuses_to_clobber_and_evaluates_only(tmp_path, capsys):
    out = str(tmp_path / "runs")
    argv = ["--dataset", "synthetic", "--backbone", "tiny", "--frame", "4", "--shots", "2", "--epochs", "2",
            "--batch-size", "8", "--workers", "0", "--out", out, "--eval-every", "1"]
    metrics = runner.run(bv, runner.parse_args(bv, argv))
    folder = runner.run_dir(out, "biomedvr", "synthetic", 2, 1, backbone="tiny")
    record = json.loads((folder / "metrics.json").read_text())
    assert set(record["metrics"]) >= {"test", "gate", "best_test_accuracy_test_selected"}
    assert record["metrics"]["test"]["n"] == 160 and len(record["metrics"]["gate"]) == 2
    assert record["args"]["backbone"] == "tiny" and record["trainable_parameters"] == 2 * 3 * 32 * 32 + 2
    ckpt = runner.load_checkpoint(folder)
    assert set(ckpt["trainable"]) == {"delta_plus", "delta_minus", "gate"}
    assert set(ckpt) == {"trainable", "args", "script", "epoch", "history", "classnames", "class_text"}  # finished: no optimiser, no RNG
    with pytest.raises(UserError, match="already holds a finished run"):
        runner.run(bv, runner.parse_args(bv, argv))
    with pytest.raises(SystemExit) as exit_:
        runner.run_method(bv, argv=argv)
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    checkpoint = (folder / "checkpoint.pt").read_bytes()
    evaluated = runner.run(bv, runner.parse_args(bv, ["--eval-only", str(folder), "--workers", "0"]))
    assert evaluated["test"] == metrics["test"] and evaluated["gate"] == metrics["gate"]
    rewritten = json.loads((folder / "metrics.json").read_text())  # --eval-only rewrites metrics.json, as BiomedAP
    assert rewritten["metrics"]["test"] == metrics["test"] and rewritten["evaluated_with"] == {"workers": 0}
    assert rewritten["metrics"]["best_test_accuracy_test_selected"] == record["metrics"]["best_test_accuracy_test_selected"]
    assert (folder / "checkpoint.pt").read_bytes() == checkpoint  # the run itself is untouched


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        run(tmp_path, resume=True)
    run(tmp_path, epochs=2, stop_after_epoch=1)
    with pytest.raises(UserError, match="different settings .*beta"):
        run(tmp_path, epochs=2, beta=0.1, resume=True)
    with pytest.raises(UserError, match="unfinished run"):
        run(tmp_path, epochs=2)
    with pytest.raises(UserError, match="--frame 16 does not fit"):
        run(tmp_path, frame=16, overwrite=True)
    with pytest.raises(UserError, match="--topk"):
        run(tmp_path, topk=30, overwrite=True)


def test_base_to_novel_reports_base_novel_and_true_harmonic_mean(tmp_path):
    metrics = run(tmp_path, subsample="base", epochs=1)
    assert metrics["base"]["n"] == metrics["novel"]["n"] == 80  # 2 + 2 classes of 40 test images
    assert len(metrics["base"]["confusion_matrix"]) == len(metrics["novel"]["confusion_matrix"]) == 2
    assert metrics["harmonic_mean"] == pytest.approx(
        common.harmonic_mean(metrics["base"]["accuracy"], metrics["novel"]["accuracy"]))
    assert (tmp_path / "runs/tiny-clip/biomedvr/synthetic/4shot_base2novel/seed1/metrics.json").is_file()


def test_official_dataset_layout_runs_end_to_end(tmp_path):
    root = tmp_path / "data"
    images = root / "BTMRI" / "BTMRI"
    split = {"train": [], "val": [], "test": []}
    rng = random.Random(0)
    for label, name in enumerate(data.CLASSNAMES["btmri"]):
        (images / name).mkdir(parents=True)
        for part, count in (("train", 3), ("val", 1), ("test", 2)):
            for i in range(count):
                rel = f"{name}/{part}_{i}.png"
                image = Image.new("L", (40, 36), rng.randrange(256))
                image.putpixel((0, 0), 255 - image.getpixel((1, 1)))  # one colour everywhere is refused
                image.save(images / rel)
                split[part].append([rel, label, name])
    (root / "BTMRI" / "split_BTMRI.json").write_text(json.dumps(split))
    metrics = run(tmp_path, dataset="btmri", root=str(root), shots=2, epochs=1)  # text: prompts/btmri.json
    assert metrics["test"]["n"] == 8 and len(metrics["test"]["confusion_matrix"]) == 4
    assert (tmp_path / "runs/tiny-clip/biomedvr/btmri/2shot/seed1/metrics.json").is_file()


def test_a_finished_run_draws_its_programs(tmp_path):
    """programs.png: two rows (delta+, delta-), the frame alone then one training image per class."""
    run(tmp_path, epochs=1)
    folder = runner.run_dir(str(tmp_path / "runs"), "biomedvr", "synthetic", 4, 1, backbone="tiny-clip")
    with Image.open(folder / "programs.png") as picture:
        width, height = picture.size
        pixels = np.asarray(picture.convert("RGB"))
    assert 2.0 < width / height < 2.6 and pixels.std() > 10  # 5 panels a row, 2 rows, not blank
    with Image.open(folder / "confusion.png") as picture:
        assert picture.size[0] > 100


# ------------------------------------------------------------------ the ablations and the AttrVR baseline
def corner_model(**kw):
    """The hand-computed setting above: the image tower returns the top-left frame pixel."""
    banks = {"descriptions": attribute_bank([[0.9, 0.5, 0.1], [0.2, 0.3, -0.1]], [[0.1, 0.2, 0.3], [0.6, 0.1, 0.0]]),
             "distinctive": attribute_bank([[0.1, 0.0, 0.3], [0.8, 0.6, 0.4]], [[0.0, 0.5, 0.2], [0.1, 0.1, 0.1]]),
             "confusions": attribute_bank([[0.5, 0.1, 0.2], [0.0, 0.3, 0.1]], [[0.4, 0.2, 0.0], [0.9, -0.3, 0.1]])}
    calls = []
    model = bv.BioMedVR(8, 2, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), banks, logit_scale=10.0, topk=2,
                        image_tower=lambda x: calls.append(len(x)) or x[:, :, 0, 0], **kw)
    return model, calls


def test_which_scores_reach_the_logits_in_each_ablation():
    """Hand-computed as in the test above: Des/Dist on e1 give s+ = (4.5, 4.75); Conf on e1 gives
    class 0 top-2 of (.5 .1 .2) -> 3.5, class 1 of (0 .3 .1) -> 2.0, and on e2 (3.0, 5.0)."""
    e1, e2 = torch.tensor([20.0, 0.0, 0.0]), torch.tensor([0.0, 20.0, 0.0])
    x = torch.rand(2, 3, 4, 4)
    positive, calls = corner_model(experts="positive")  # AttrVR: s+ alone, one pass of B images
    with torch.no_grad():
        positive.delta_plus[:, 0, 0] = e1
    out = positive(x)
    assert calls == [2] and out["s_minus"] is None and out["gate"] is None
    assert torch.allclose(out["logits"], torch.tensor([[4.5, 4.75]] * 2), atol=1e-5)
    shared, calls = corner_model(programs=1)  # both experts read the one program, seen once
    with torch.no_grad():
        shared.delta[:, 0, 0] = e1
    out = shared(x)
    assert calls == [2] and torch.allclose(out["s_minus"], torch.tensor([[3.5, 2.0]] * 2), atol=1e-5)
    assert torch.allclose(out["logits"], 0.5 * out["s_plus"] + 0.5 * out["s_minus"], atol=1e-6)
    fixed, calls = corner_model(gate="fixed")  # both programs, g = (1/2, 1/2) whatever happens
    with torch.no_grad():
        fixed.delta_plus[:, 0, 0], fixed.delta_minus[:, 0, 0] = e1, e2
    out = fixed(x)
    assert calls == [4] and out["gate"].tolist() == [0.5, 0.5]
    assert torch.allclose(out["logits"], torch.tensor([[3.75, 4.875]] * 2), atol=1e-5)


@pytest.mark.parametrize("kw, trained", [({}, {"delta_plus", "delta_minus", "gate"}),
                                         ({"experts": "positive"}, {"delta_plus"}),
                                         ({"programs": 1}, {"delta", "gate"}),
                                         ({"gate": "fixed"}, {"delta_plus", "delta_minus"})])
def test_each_ablation_trains_exactly_its_parameters(backbones, kw, trained):
    bb = backbones("tiny-clip")
    args = runner.cli_args(bv)(**{**FAST, **kw})
    text = classtext.load_class_text("synthetic", list(data.SYNTHETIC_LOOKS))
    model = bv.build(bb, list(data.SYNTHETIC_LOOKS), text, bv.configure(args, bb, text), args)
    params = dict(model.named_parameters())
    assert set(params) == trained and all(p.requires_grad for p in params.values())
    start = {k: p.detach().clone() for k, p in params.items()}
    optimizer, _ = bv.make_optimizer(model, 1, 1, lr=40.0)
    beta = 0.0 if kw.get("experts") == "positive" else 0.3
    terms, _ = bv.train_step(model, torch.rand(3, 3, 24, 24), torch.tensor([0, 1, 2]), optimizer, beta=beta)
    assert set(terms) == ({"loss", "ce"} if beta == 0 else {"loss", "ce", "cs"})  # no L_CS without s-
    assert all(not torch.equal(start[k], params[k]) for k in params)
    assert all(p.grad is None for p in bb.model.parameters())
    if kw.get("gate") == "fixed":  # a constant, not a learned tensor: nothing a checkpoint keeps
        assert model.gate.softmax(0).tolist() == [0.5, 0.5] and "gate" not in model.state_dict()
    with pytest.raises(ValueError, match="beta"):  # the positive expert alone has nothing to suppress
        bv.biomedvr_loss(corner_model(experts="positive")[0](torch.rand(1, 3, 4, 4)), torch.tensor([0]), beta=0.3)


def test_the_shared_program_learns_from_both_experts_and_l_cs():
    model, _ = corner_model(programs=1)
    out = model(torch.rand(2, 3, 4, 4))
    for score in ("s_plus", "s_minus"):
        grad, = torch.autograd.grad(out[score].sum(), [model.delta], retain_graph=True)
        assert grad.abs().sum() > 0, score
    cs = bv.biomedvr_loss(out, torch.tensor([0, 1]), beta=0.3)["cs"]
    grad, = torch.autograd.grad(cs, [model.delta])
    assert cs > 0 and grad.abs().sum() > 0


def test_gate_lr_is_the_gate_s_own_annealed_rate_and_the_default_is_one_group():
    model, _ = corner_model()
    optimizer, scheduler = bv.make_optimizer(model, epochs=2, steps_per_epoch=2, lr=40.0, gate_lr=0.4)
    programs, gate = optimizer.param_groups
    assert programs["params"] == [model.delta_plus, model.delta_minus] and gate["params"] == [model.gate]
    assert (programs["lr"], gate["lr"]) == (40.0, 0.4)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([40.0 * (1 + math.cos(math.pi / 4)) / 2,
                                                      0.4 * (1 + math.cos(math.pi / 4)) / 2])
    assert len(bv.make_optimizer(model, 2, 2, lr=40.0)[0].param_groups) == 1  # as released
    with pytest.raises(ValueError, match="learns no gate"):
        bv.make_optimizer(corner_model(gate="fixed")[0], 2, 2, gate_lr=0.4)


def test_ablation_flags_refuse_what_contradicts_and_have_their_own_run_folders():
    args = lambda **kw: runner.cli_args(bv)(**{**FAST, **kw})  # noqa: E731
    for kw, message in (({"experts": "positive"}, "--beta > 0"), ({"experts": "positive", "beta": 0.0, "programs": 1},
                         "--programs 1"), ({"experts": "positive", "beta": 0.0, "gate": "fixed"}, "--gate fixed"),
                        ({"experts": "positive", "beta": 0.0, "gate_lr": 0.4}, "--gate-lr"),
                        ({"gate": "fixed", "gate_lr": 0.4}, "--gate-lr")):
        with pytest.raises(UserError, match=message):
            runner.validate_args(args(**kw))
    runner.validate_args(args(experts="positive", beta=0.0))
    names = [bv.run_name(args(**kw)) for kw in ({}, {"beta": 0.0}, {"programs": 1}, {"gate": "fixed"},
                                                {"experts": "positive", "beta": 0.0}, {"gate_lr": 0.4},
                                                {"cs_anchor": "fused", "beta": 0.0})]
    assert names == ["biomedvr", "biomedvr-no-cs", "biomedvr-shared-program", "biomedvr-fixed-gate",
                     "biomedvr-positive-no-cs", "biomedvr-gate-lr0.4", "biomedvr-fused-no-cs"]
    with pytest.raises(SystemExit):  # one line from argparse, not a traceback
        runner.parse_args(bv, ["--programs", "3"])


@pytest.mark.parametrize("kw, saved", [({"experts": "positive", "beta": 0.0}, {"delta_plus"}),
                                       ({"programs": 1}, {"delta", "gate"}),
                                       ({"gate": "fixed"}, {"delta_plus", "delta_minus"})])
def test_each_ablation_runs_end_to_end_in_its_own_folder(tmp_path, kw, saved):
    metrics = run(tmp_path, epochs=1, **kw)
    folder = runner.run_folder(bv, runner.cli_args(bv)(**{**FAST, "out": str(tmp_path / "runs"), **kw}))
    assert folder.parts[-4] != "biomedvr" and (folder / "programs.png").is_file()
    assert set(torch.load(folder / "checkpoint.pt", weights_only=True)["trainable"]) == saved
    assert ("gate" in metrics) == (kw.get("experts") != "positive") and 0 <= metrics["test"]["accuracy"] <= 100
