"""Both methods on a GPU: end to end in fp32 and bf16, the same fp32 logits as the CPU,
checkpoints that move between the GPU and the CPU, exact resume, loader workers with pinned
memory, and one bf16 training step of the full-size BiomedCLIP architecture.

The device under test is MEDVL_TEST_DEVICE (default cuda); where it is missing every test is
skipped with the reason, so the CPU suite stays green. MEDVL_TEST_DEVICE=cpu runs the same
logic on the CPU: the bf16 tests skip (common.autocast refuses bf16 there) and the
cross-device tests become cpu <-> cpu. Runs go through the command-line parser and `main`,
and read only what a user sees: metrics.json, checkpoint.pt and the printed benchmark line.
"""
import json
import math
import os

import pytest
import torch

import biomedap
import biomedvr
import classtext
import common
import runner
import data

DEVICE = os.environ.get("MEDVL_TEST_DEVICE", "cuda")


def _available(device):
    if device == "cpu":
        return True
    return device.split(":")[0] == "cuda" and torch.cuda.is_available()


pytestmark = pytest.mark.skipif(not _available(DEVICE), reason=(
    f"device under test {DEVICE!r} is missing (torch.cuda.is_available() is False); "
    f"MEDVL_TEST_DEVICE=cpu runs this file's logic on the CPU"))

BF16 = DEVICE != "cpu" and _available(DEVICE) and torch.cuda.is_bf16_supported()
PRECISIONS = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not BF16, reason="bf16 needs a CUDA device that supports it (common.autocast refuses it on the CPU)"))]
# (module, its flags, its run folder's method name)
METHODS = {"biomedap-paper": (biomedap, ["--variant", "paper"], "biomedap"),
           "biomedap-official": (biomedap, ["--variant", "official"], "biomedap-official"),
           "biomedvr": (biomedvr, [], "biomedvr")}
TRAIN = ["--dataset", "synthetic", "--backbone", "tiny-clip", "--shots", "2", "--epochs", "2", "--workers", "0"]
TEST_IMAGES = 160  # synthetic: 40 test images per class, 4 classes
# fp32 CPU against GPU, in cosine units (logits / logit scale). fp32 on CUDA is not bit-exact:
# reductions run in another order (~1e-6 here), and PyTorch lets cuDNN run fp32 convolutions
# (the patch embedding) in TF32 by default. Rounding the patch convolution's operands to TF32 on
# the CPU moves tiny-clip's and tiny's logits by at most 5e-5 in these units; 2e-4 leaves 4x
# room and still catches a bf16 leak (bf16 carries 8 bits: ~4e-3 relative).
LOGIT_TOL = 2e-4


def cli(module, *argv):
    """The method's command line, run in this process (the imports are already paid)."""
    return runner.run(module, runner.parse_args(module, [str(a) for a in argv]))


def train(method, out, device, *flags):
    """Train one run on `device`; its run folder (runs/<method>/synthetic/2shot/seed1)."""
    module, method_flags, name = METHODS[method]
    cli(module, *TRAIN, *method_flags, "--device", device, "--out", out, *flags)
    return runner.run_dir(str(out), name, "synthetic", 2, 1, backbone="tiny-clip")


def recorded(folder):
    return json.loads((folder / "metrics.json").read_text())


def tensors(obj):
    """Every tensor inside a checkpoint, wherever the method keeps it."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors(value)


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_trains_end_to_end(tmp_path, method, precision):
    folder = train(method, tmp_path, DEVICE, "--epochs", 3, "--precision", precision)
    record = recorded(folder)
    assert record["args"]["device"] == DEVICE and record["args"]["precision"] == precision
    test = record["metrics"]["test"]
    assert test["n"] == TEST_IMAGES and 0 <= test["accuracy"] <= 100
    assert all(math.isfinite(test[k]) for k in ("accuracy", "macro_f1", "balanced_accuracy", "ece"))
    floats = [t for t in tensors(runner.load_checkpoint(folder)) if t.is_floating_point()]
    # bf16 autocast computes in bf16 but learns and saves fp32 tensors, and nothing overflowed
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)


# ------------------------------------------------------------------ the same numbers as the CPU
def build(method, device):
    """The method's model on tiny-clip on `device`, learnables set from a fixed CPU stream."""
    backbone = common.load_backbone("tiny-clip", device)  # random towers: the same on every device
    torch.manual_seed(0)
    if method.startswith("biomedap"):
        args = runner.cli_args(biomedap)(variant=METHODS[method][1][1], backbone="tiny-clip", device=device)
        text = data.synthetic_class_text()
        cfg = biomedap.resolve(args, "synthetic", backbone, text["ctx_init"])
        model = biomedap.build_model(backbone, list(text["classes"]), text, cfg, args, device)
    else:
        args = runner.cli_args(biomedvr)(dataset="synthetic", backbone="tiny-clip", device=device)
        names = list(data.SYNTHETIC_LOOKS)
        model = biomedvr.build_model(backbone, classtext.load_class_text("synthetic", names), names, args, device)
    g = torch.Generator().manual_seed(1)  # move every learnable off its initial value
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    return model.eval(), backbone


@pytest.mark.parametrize("method", METHODS)
def test_fp32_logits_match_the_cpu(method):
    cpu_model, backbone = build(method, "cpu")
    dev_model, _ = build(method, DEVICE)
    S, g = backbone.image_size, torch.Generator().manual_seed(2)
    if method == "biomedvr":  # images in [0, 1] inside the frame
        w = cpu_model.frame
        images = torch.rand(8, 3, S - 2 * w, S - 2 * w, generator=g)
    else:                     # normalised images
        images = torch.randn(8, 3, S, S, generator=g)
    with torch.no_grad():
        expected = cpu_model(images)["logits"]
        got = dev_model(images.to(DEVICE))["logits"].cpu()
    assert got.dtype == expected.dtype == torch.float32
    gap = (got - expected).abs().max().item() / backbone.logit_scale
    assert gap <= LOGIT_TOL, f"fp32 logits differ by {gap:.2e} (cosine units) between cpu and {DEVICE}"


# ------------------------------------------------------------------ checkpoints across devices
DIRECTIONS = sorted({(DEVICE, "cpu"), ("cpu", DEVICE)})


@pytest.mark.parametrize("src, dst", DIRECTIONS, ids=[f"{a}-to-{b}" for a, b in DIRECTIONS])
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_resumes_and_evaluates_on_the_other_device(tmp_path, method, src, dst):
    """Stop on src after epoch 1, finish on dst (a src checkpoint resumes on dst), then
    evaluate the finished run on src (a dst checkpoint evaluates on src)."""
    folder = train(method, tmp_path, src, "--stop-after-epoch", 1)
    assert (folder / "checkpoint.pt").is_file() and not (folder / "metrics.json").exists()
    train(method, tmp_path, dst, "--resume")
    record = recorded(folder)
    assert record["args"]["device"] == dst and record["metrics"]["test"]["n"] == TEST_IMAGES
    evaluated = cli(METHODS[method][0], "--eval-only", folder, "--device", src, "--workers", 0)
    # the same run scored on the other device: fp32 differences may flip a near tie, no more
    one_image = 100 / TEST_IMAGES
    assert abs(evaluated["test"]["accuracy"] - record["metrics"]["test"]["accuracy"]) <= one_image + 1e-9
    if src == dst:
        assert evaluated["test"] == record["metrics"]["test"]


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("method", METHODS)
def test_resume_on_the_device_gives_the_uninterrupted_metrics(tmp_path, method):
    straight = recorded(train(method, tmp_path / "straight", DEVICE, "--epochs", 3))["metrics"]
    train(method, tmp_path / "resumed", DEVICE, "--epochs", 3, "--stop-after-epoch", 2)
    resumed = recorded(train(method, tmp_path / "resumed", DEVICE, "--epochs", 3, "--resume"))["metrics"]
    assert resumed == straight


# ------------------------------------------------------------------ loader workers
def test_four_workers_give_seeded_pinned_batches():
    splits = data.load_splits("synthetic", image_size=32)
    dataset = data.ImageDataset(splits.train[:32], data.build_transform(32, train=True))
    first, second = ([b for b in data.make_loader(dataset, 8, True, seed=3, workers=4)] for _ in range(2))
    assert len(first) == 4
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # worker augmentations follow the seed
        # pinned host memory wherever CUDA is present, so copies to the GPU can overlap
        assert x1.is_pinned() == torch.cuda.is_available()


@pytest.mark.parametrize("method", ["biomedap-paper", "biomedvr"])
def test_trains_with_four_workers(tmp_path, method):
    folder = train(method, tmp_path, DEVICE, "--workers", 4)
    record = recorded(folder)
    assert record["args"]["workers"] == 4 and record["metrics"]["test"]["n"] == TEST_IMAGES


# ------------------------------------------------------------------ full size
@pytest.fixture(scope="module")
def full_size():
    return common.load_backbone("biomedclip-random", DEVICE)


# trainable parameters on the full-size architecture (README, Measured speed)
FULL_SIZE_PARAMETERS = {"biomedap-paper": 30_741_504, "biomedap-official": 30_710_784, "biomedvr": 301_058}


@pytest.mark.skipif(not BF16, reason="bf16 needs a CUDA device that supports it")
@pytest.mark.parametrize("method", METHODS)
def test_full_size_training_step_in_bf16(full_size, monkeypatch, method):
    """The benchmark's code path, each pass run once: one bf16 training step of the method, its
    floor, and inference, on the full-size BiomedCLIP architecture with random weights."""
    monkeypatch.setattr(biomedap, "load_backbone", lambda name, device: full_size)
    monkeypatch.setattr(common, "load_backbone", lambda name, device: full_size)
    once = runner.time_ms
    monkeypatch.setattr(runner, "time_ms", lambda fn, device, warmup, reps: once(fn, device, 0, 1))
    module, flags, _ = METHODS[method]
    report = cli(module, "--benchmark", "--backbone", "biomedclip-random", "--device", DEVICE,
                 "--precision", "bf16", *flags)
    assert report["precision"] == "bf16" and report["device"] == runner.device_name(torch.device(DEVICE))
    assert report["trainable_parameters"] == FULL_SIZE_PARAMETERS[method]
    assert math.isfinite(report["step_ms"]) and report["step_ms"] > 0
    assert report["peak_memory_mb"] > 195.9e6 * 4 / 2**20  # at least the fp32 weights (196 M parameters)
