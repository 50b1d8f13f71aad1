"""BioMedVR: Confusion-Aware Mixture-of-Prompt Experts for Biomedical Visual Reprogramming.

Jiaxiang Liu et al., arXiv 2606.24740 (https://arxiv.org/abs/2606.24740); official code
github.com/JXLiu-AI/BioMedVR (`experiments/biomedvr.py`), a fork of AttrVR (Cai et al., ICLR 2025).

Idea: the frozen vision-language model is left alone; two learnable pixel frames around the image
(visual reprogramming programs) make two "experts". The positive expert delta+ is scored against
descriptive and distinctive class attributes, the negative expert delta- against LLM-written
confusion-aware attributes ("looks like X but is Y"). A learned softmax gate mixes the two, and a
margin loss keeps the strongest confusion score below the true class's positive score.

Symbols: B batch, C classes, S backbone input size, w frame width (S - 2w: the image inside it),
m attributes per class, k top-k, E joint embedding width.

Equation map. The paper's method section could not be read: its abstract, its pipeline figure
on the project page and Table 1 could; each line names where the piece is drawn or said:
    padding VR program x + sigmoid(delta) * M, then normalise (pipeline figure; AttrVR)  -> `BioMedVR.reprogram`
    attribute sets Des, Dist, Conf, m per class (abstract, pipeline figure)  -> `sample_attributes`, `attribute_banks`
    k-nearest attribute score s_c = mean of the top-k s cos(z, a), s the
      backbone's logit scale (100 for CLIP; figure: "Top-K")  -> `topk_score`
    positive expert s+ = (s_Des + s_Dist) / 2 on delta+, negative expert
      s- = s_Conf on delta- (abstract, pipeline figure)  -> `BioMedVR.forward`
    adaptive gate g = softmax(w), logits = g+ s+ + g- s- (abstract, pipeline figure)  -> `BioMedVR.forward`
    L = CE(logits, y) + beta L_CS (abstract)  -> `cross_entropy_loss`, `compute_losses`
    confusion suppression L_CS = mean_i relu(max_c s-_ic - anchor_iy + margin),
      anchor s+_y (figure: "s+_y - s-_c > m") or the fused logit (released)  -> `confusion_suppression_loss`
    training images: resize to S-2w, random-resized crop, flip (released)  -> `make_train_loader`
    SGD, cosine to 0 over epochs x steps per epoch (released)  -> `make_optimizer`

Deviations from the paper / official code (the released Table-1 script, `experiments/biomedvr.py`):
  * The reported number is the LAST epoch's test accuracy; the official code evaluates the test set
    every epoch and reports the best (model selection on the test set). `--eval-every N` logs test
    accuracy every N epochs and records `best_test_accuracy_test_selected`, labelled as such.
  * Splits: the official code reads its own `split_liu_<DIR>.json` files, which are not published
    (class names with underscores, another label order); we use BiomedCoOp's published
    `split_<DIR>.json`, so the test sets and the few-shot subsets are not the paper's.
  * Few-shot subsets follow the run seed. The official code caches the subset under the name
    `shot_K-seed_0.pkl` whatever the seed; the first run draws it with its own seed and every
    later run, whatever its seed, reuses it.
  * `--cs-anchor` defaults to `positive` (anchor s+_y: the paper's figure draws the margin as
    s+_y - s-_c > m); the released Table-1 script anchors on the fused logit of y, which
    `--cs-anchor fused` selects and `run.sh tables biomedvr` passes.
  * Default backbone BiomedCLIP; the paper's Table 1 used OpenAI CLIP ViT-B/16 (`--backbone clip`).
    The logit scale is the backbone's own, frozen (100 for CLIP). The official code also clamps
    CLIP's logit scale to ln(100) after every step: a no-op, since it is frozen at that value.
  * Attribute text is the project's own (`prompts/<dataset>.json`). The sampling rule is the
    released one: a set with MORE than m = 20 sentences gives m distinct ones (random.sample),
    otherwise m are drawn with replacement (random.choices). Our descriptive sets hold more than
    20, so they give 20 distinct sentences (the released medical files had 5 a set, all 20 draws
    duplicates); our distinctive and confusion sets (5-7) are drawn with replacement, as released.
    The sampling uses its own `random.Random(seed)` instead of the global stream, so eval-only
    rebuilds the same banks; sentences are stripped of surrounding spaces before the 20-character
    filter. Every class needs confusion-aware attributes (the official code scores s- = 0 for a
    dataset without a confusion file).
  * Both programs pass through the image tower as ONE batch of 2B images (same arithmetic).
  * bf16 autocast on CUDA (`--precision bf16`) instead of fp16 autocast without a GradScaler;
    the expert scores are always computed in fp32. fp32 is the default (the official code also
    evaluates in fp32).
  * The L_CS cap at 1000 in the official code is omitted (it never binds).
  * The images are resized to S - 2w and zero-padded by the frame, as AttrVR; the official resize
    to 192 is the same for S = 224, w = 16. The frame width w defaults to 16/224 of the
    backbone's input size (16 at 224, as official), so other input sizes keep the same proportion.
  * Random draws are not the official ones: the official loader shuffles and augments from the
    global torch stream in the main process and sets cuDNN deterministic; ours draws each epoch's
    order and each image's augmentation from (seed, epoch, image index) alone, in whichever
    worker process (`--workers`) loads it, and leaves cuDNN's defaults, so a GPU rerun can differ
    at float rounding. The same seed repeats a run on the CPU, with any number of workers.
  * Images are decoded as a viewer shows them (`data.to_rgb`: EXIF orientation applied, alpha
    composited on white, 16-bit and float images stretched from their finite range; one-colour or
    over 20:1 images are refused); the official loader uses PIL's convert("RGB"). Both give the same
    pixels for 8-bit RGB or grey files without an EXIF orientation tag.
  * Base-to-novel (`--subsample base`) is ours; the official code trains on all classes only.
"""
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import runner
from common import UserError
from runner import arg

ATTRIBUTE_SETS = ("descriptions", "distinctive", "confusions")  # Des, Dist, Conf


@dataclass
class Args(runner.RunArgs):  # + the run flags (--eval-only, --resume, --device, --out, ...)
    dataset: str = arg("btmri", "benchmark (btmri, busi, ...), synthetic, or your own folder of class sub-folders")
    shots: int = arg(16, "K labelled training images per class", at_least=1)
    seed: int = arg(1, "seed of the few-shot subset, the initialisation and the data order", at_least=0)
    subsample: str = arg("all", "all: few-shot on every class; base: train on base classes, test base and novel",
                         ["all", "base"])
    backbone: str = arg("biomedclip", "frozen backbone: biomedclip, clip, hf-hub:ORG/REPO, local-dir:PATH, tiny")
    # the method (paper Table 1 / released Table-1 script defaults)
    frame: int = arg(None, "w: width of the learnable padding frame in pixels; none = 16/224 of the "
                     "input size (official: 16 at 224)", at_least=1)
    num_attr: int = arg(20, "m: attributes drawn per class and set (official: 20)", at_least=1)
    topk: int = arg(3, "k: nearest attributes averaged per class (official: 3)", at_least=1)
    min_chars: int = arg(20, "drop attribute sentences shorter than this (official: 20)", at_least=0)
    gate_init: float = arg(1.0, "initial value of both gate logits w (official: (1, 1))")
    beta: float = arg(0.3, "beta: weight of the confusion-suppression loss (official: 0.3)", at_least=0)
    margin: float = arg(0.5, "margin of L_CS in logit units (official: 0.5)")
    cs_anchor: str = arg("positive", "L_CS anchor: positive = s+_y (the paper's figure), fused = fused "
                         "logit of y (the released Table-1 script; run.sh tables biomedvr)", ["positive", "fused"])
    # optimisation
    epochs: int = arg(400, "training epochs (official: 400)", at_least=1)
    batch_size: int = arg(None, "batch size; none = 64, or 16 at one shot (official)", at_least=1)
    lr: float = arg(40.0, "SGD learning rate, cosine to 0 per iteration (official: 40)", above=0)
    momentum: float = arg(0.9, "SGD momentum (official: 0.9; no weight decay)", at_least=0, below=1)
    # evaluation
    eval_every: int = arg(0, "also evaluate the test set every N epochs (0: only at the end); "
                          "the best of these is reported as test-selected", at_least=0, resume_may_differ=True)


# --------------------------------------------------------------------------- text side
def sample_attributes(sentences, m: int, rng: random.Random, min_chars: int = 20):
    """AttrVR's rule: drop short sentences, then exactly m, without replacement when there are
    more than m, otherwise with replacement."""
    kept = [s.strip() for s in sentences if len(s.strip()) >= min_chars]
    if not kept:
        raise UserError(f"no attribute sentence has at least {min_chars} characters; "
                        f"write longer ones or lower --min-chars")
    return rng.sample(kept, m) if len(kept) > m else rng.choices(kept, k=m)


@torch.no_grad()
def attribute_banks(backbone, class_text, classnames, args):
    """Des, Dist, Conf as normalised frozen text features, each (m, C, E); encoded once."""
    rng = random.Random(args.seed)
    drawn = {field: [sample_attributes(class_text["classes"][c][field], args.num_attr, rng, args.min_chars)
                     for c in classnames] for field in ATTRIBUTE_SETS}
    unique = list(dict.fromkeys(s for per_class in drawn.values() for group in per_class for s in group))
    feats = common.encode_sentences(backbone, unique)  # (n_unique, E), each sentence once
    index = {s: i for i, s in enumerate(unique)}
    return {field: feats[torch.tensor([[index[s] for s in group] for group in per_class])].transpose(0, 1)
            for field, per_class in drawn.items()}  # (C, m, E) -> (m, C, E)


def topk_score(z, bank, logit_scale: float, k: int):
    """k-nearest attribute score: mean of the k highest logit_scale * cos(z, a) over a class's
    m attributes. z (B, E) and bank (m, C, E) normalised -> (B, C)."""
    sims = logit_scale * torch.einsum("be,mce->bmc", z, bank)  # (B, m, C)
    return sims.topk(k, dim=1).values.mean(dim=1)  # (B, C)


# --------------------------------------------------------------------------- the model
class BioMedVR(nn.Module):
    """Two padding programs, the frozen attribute banks, the gate. The frozen image tower is
    passed in as a function and is not part of this module's state."""

    def __init__(self, image_size, frame, mean, std, banks, logit_scale, topk, gate_init=1.0,
                 image_tower=None):
        super().__init__()
        S = image_size
        self.frame, self.logit_scale, self.topk, self.image_tower = frame, logit_scale, topk, image_tower
        self.delta_plus = nn.Parameter(torch.zeros(3, S, S))   # positive expert's program
        self.delta_minus = nn.Parameter(torch.zeros(3, S, S))  # negative expert's program
        self.gate = nn.Parameter(torch.full((2,), float(gate_init)))  # w: logits of (g+, g-)
        mask = torch.ones(1, S, S)
        mask[:, frame:S - frame, frame:S - frame] = 0  # M: 1 on the frame, 0 on the image
        self.register_buffer("mask", mask)
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1))
        self.set_attributes(banks)

    def set_attributes(self, banks):
        """Swap the attribute banks (m, C, E), e.g. for the novel classes."""
        for field in ATTRIBUTE_SETS:
            self.register_buffer(field, banks[field].to(self.mask.device))

    def reprogram(self, images):
        """Padding VR: (B, 3, S-2w, S-2w) in [0, 1] -> (2B, 3, S, S) normalised, delta+ then delta-."""
        w = self.frame
        x = F.pad(images, (w, w, w, w))  # (B, 3, S, S), zero frame
        programs = torch.stack([self.delta_plus, self.delta_minus]).sigmoid() * self.mask  # (2, 3, S, S)
        x = (x.unsqueeze(0) + programs.unsqueeze(1)).flatten(0, 1)  # (2, B, 3, S, S) -> (2B, 3, S, S)
        return (x - self.mean) / self.std

    def forward(self, images):
        B = images.shape[0]
        z = self.image_tower(self.reprogram(images))  # (2B, E): one pass for both experts
        with torch.autocast(z.device.type, enabled=False):  # scores in fp32 under bf16 autocast
            z = F.normalize(z.float(), dim=-1)
            z_plus, z_minus = z[:B], z[B:]  # (B, E) each
            s_plus = 0.5 * (topk_score(z_plus, self.descriptions, self.logit_scale, self.topk)
                            + topk_score(z_plus, self.distinctive, self.logit_scale, self.topk))  # (B, C)
            s_minus = topk_score(z_minus, self.confusions, self.logit_scale, self.topk)  # (B, C)
            g = self.gate.softmax(0)  # (g+, g-)
            logits = g[0] * s_plus + g[1] * s_minus  # (B, C)
        return {"logits": logits, "s_plus": s_plus, "s_minus": s_minus, "gate": g}


def frame_width(args, S):
    """w: --frame, or the official 16 pixels scaled to the backbone's input size S."""
    w = args.frame if args.frame is not None else max(1, round(16 * S / 224))
    if not 0 < 2 * w < S:
        raise UserError(f"--frame {w} does not fit a {S}-pixel input: use 1..{(S - 1) // 2}")
    return w


def build_model(backbone, class_text, classnames, args, device):
    S = backbone.image_size
    if not 0 < args.topk <= args.num_attr:
        raise UserError(f"--topk {args.topk} must be between 1 and --num-attr {args.num_attr}")
    banks = attribute_banks(backbone, class_text, classnames, args)
    return BioMedVR(S, frame_width(args, S), backbone.mean, backbone.std, banks, backbone.logit_scale, args.topk,
                    args.gate_init, image_tower=backbone.encode_image).to(device)


# --------------------------------------------------------------------------- losses
def cross_entropy_loss(logits, labels):
    # CE(fused logits, y)
    return F.cross_entropy(logits, labels)


def confusion_suppression_loss(s_minus, anchor_scores, labels, margin: float):
    # L_CS = mean_i relu(max_c s-_{i,c} - anchor_{i,y_i} + margin); the max runs over all classes
    anchor = anchor_scores.gather(1, labels[:, None]).squeeze(1)  # (B,)
    return F.relu(s_minus.max(dim=1).values - anchor + margin).mean()


def compute_losses(model, images, labels, args):
    out = model(images)
    anchor = out["s_plus"] if args.cs_anchor == "positive" else out["logits"]
    ce = cross_entropy_loss(out["logits"], labels)
    cs = confusion_suppression_loss(out["s_minus"], anchor, labels, args.margin)
    loss = ce + args.beta * cs
    return {"loss": loss, "ce": ce, "cs": cs, "logits": out["logits"]}


# --------------------------------------------------------------------------- training step
def train_step(model, images, labels, optimizer, args):
    """One SGD step on L = CE + beta L_CS; returns the logged loss terms and the logits."""
    with common.autocast(args.precision, images.device):
        out = compute_losses(model, images, labels, args)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return {k: float(out[k].detach()) for k in ("loss", "ce", "cs")}, out["logits"].detach()


# =========================================================================== plumbing
def load_data(args, S):
    """Training split and evaluation sets {name: Splits}; images of size S - 2w, unnormalised."""
    inner = S - 2 * frame_width(args, S)
    full = data.load_splits(args.dataset, args.root, args.download, image_size=inner, show=True)
    train = data.subsample_classes(data.few_shot_splits(full, args.shots, args.seed), args.subsample)
    if args.subsample == "base":
        evals = {"base": train, "novel": data.subsample_classes(full, "novel")}
    else:
        evals = {"test": train}
    return train, evals


def batch_size(args):
    return args.batch_size or (16 if args.shots == 1 else 64)


def make_train_loader(train, S, args):
    """The released pipeline: resize the shorter side to S - 2w, random-resized crop to S - 2w,
    horizontal flip, drawn from (seed, epoch, image index); every image every epoch (the last
    partial batch is kept)."""
    inner = S - 2 * frame_width(args, S)
    transform = data.build_transform(inner, train=True, hflip=True, resize_first=True)
    return data.make_loader(data.ImageDataset(train.train, transform), batch_size(args), True, args.seed,
                            args.workers, drop_last=False)


def make_eval_loaders(evals, S, args):
    transform = data.build_transform(S - 2 * frame_width(args, S))
    return {name: data.make_loader(data.ImageDataset(s.test, transform), batch_size(args), False, args.seed,
                                   args.workers) for name, s in evals.items()}


def make_optimizer(model, args, steps_per_epoch):
    """SGD on the programs and the gate, cosine annealing to 0 stepped once per iteration."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch,
                                                           eta_min=0.0)
    return optimizer, scheduler


def setup(args, device):
    """(backbone, model, train, evals, text, cfg), the same in both method files: the frozen
    backbone; the model for the training classes; the training classes' few-shot splits; the
    evaluation blocks {"test"} or {"base", "novel"} (Splits whose .test is scored); the class
    text; the resolved values of the knobs left at none (frame width, batch size)."""
    backbone = common.load_backbone(args.backbone, device)
    train, evals = load_data(args, backbone.image_size)
    everyone = [name for split in evals.values() for name in split.classnames]  # base and novel alike
    class_text = data.load_class_text(args.dataset, everyone, args.root, method="biomedvr")
    data.check_text_fits(backbone, class_text, everyone, data.CLASS_TEXT_ENCODES["biomedvr"])
    model = build_model(backbone, class_text, train.classnames, args, device)
    cfg = {"frame": frame_width(args, backbone.image_size), "batch_size": batch_size(args)}
    return backbone, model, train, evals, class_text, cfg


def train_one_epoch(model, loader, optimizer, scheduler, args, device):
    """One pass over the training images (the scheduler steps every iteration): the mean of each
    loss term, the training accuracy and the last step's learning rate."""
    model.train()
    sums, correct, seen = {}, 0, 0
    for images, labels in tqdm(loader, desc="train", leave=False, disable=None):
        images, labels = images.to(device), labels.to(device)
        terms, logits = train_step(model, images, labels, optimizer, args)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    return {**{k: v / seen for k, v in sums.items()}, "train_accuracy": 100 * correct / seen, "lr": lr}


@torch.no_grad()
def evaluate(model, loader, args, device):
    """Classification metrics of one evaluation split."""
    model.eval()
    logits, labels = [], []
    for images, y in tqdm(loader, desc="evaluate", leave=False, disable=None):
        with common.autocast(args.precision, device):
            logits.append(model(images.to(device))["logits"].float().cpu())
        labels.append(y)
    return common.classification_metrics(torch.cat(logits), torch.cat(labels), model.descriptions.shape[1])


def evaluate_all(model, backbone, train, evals, text, cfg, args, device):
    """{"test"} or {"base", "novel", "harmonic_mean"}, plus the learned gate (g+, g-). Novel
    classes: the same programs and gate with attribute banks drawn for the novel class names."""
    loaders = make_eval_loaders(evals, backbone.image_size, args)
    gate = model.gate.detach().softmax(0).tolist()
    if args.subsample != "base":
        return {"test": evaluate(model, loaders["test"], args, device), "gate": gate}
    metrics = {"base": evaluate(model, loaders["base"], args, device)}
    model.set_attributes(attribute_banks(backbone, text, evals["novel"].classnames, args))
    metrics["novel"] = evaluate(model, loaders["novel"], args, device)
    metrics["harmonic_mean"] = common.harmonic_mean(metrics["base"]["accuracy"], metrics["novel"]["accuracy"])
    metrics["gate"] = gate
    return metrics


def classnames_of(evals):
    """Class names per evaluation block, for the axes of confusion.png."""
    return {name: split.classnames for name, split in evals.items()}


@torch.no_grad()
def save_programs_png(model, train, S, args, path, n=4):
    """programs.png: the two learned frames alone (first column), then a few training images (one
    per class, test transform) as the frozen image tower sees them under delta+ and delta-."""
    firsts = list({item.label: item for item in reversed(train.train)}.values())[::-1][:n]
    dataset = data.ImageDataset(firsts, data.build_transform(S - 2 * frame_width(args, S)))
    images = torch.stack([dataset[i][0] for i in range(len(firsts))]).to(model.mask.device)
    seen = model.reprogram(images) * model.std + model.mean  # (2n, 3, S, S), un-normalised to [0, 1]
    frames = torch.stack([model.delta_plus, model.delta_minus]).sigmoid() * model.mask  # (2, 3, S, S)
    fig = runner.new_figure(1.5 * (len(firsts) + 1), 3.3)
    axes = fig.subplots(2, len(firsts) + 1, squeeze=False)
    for row, expert in enumerate(("delta+ (positive)", "delta- (negative)")):
        panels = [frames[row]] + [seen[row * len(firsts) + i] for i in range(len(firsts))]
        titles = ["frame alone"] + [item.classname for item in firsts]
        for ax, image, title in zip(axes[row], panels, titles):
            ax.imshow(image.clamp(0, 1).permute(1, 2, 0).cpu().numpy())  # (S, S, 3)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title if row == 0 else "", fontsize=7)
        axes[row, 0].set_ylabel(expert, fontsize=8)
    runner.atomic_write_png(fig, path)


def folder_of(args):
    """runs/[<backbone>/]biomedvr[-fused]/<dataset>/<K>shot[_base2novel]/seed<S>/"""
    method = "biomedvr" if args.cs_anchor == "positive" else "biomedvr-fused"
    return runner.run_dir(args.out, method, args.dataset, args.shots, args.seed, args.subsample, args.backbone)


def eval_only(cli):
    """Evaluate a finished run with its saved arguments (evaluation options given on this command
    line win; the same seed redraws the same attribute banks) and rewrite its metrics.json."""
    ckpt, args, given = runner.eval_only_args(cli, Args)
    if ckpt["epoch"] < args.epochs:
        raise UserError(f"{cli.eval_only} is unfinished (epoch {ckpt['epoch']} of {args.epochs}): "
                        f"finish it with --resume")
    device = common.resolve_device(args.device)
    common.seed_everything(args.seed)
    backbone, model, train, evals, text, cfg = setup(args, device)
    runner.load_trainable(model, ckpt["trainable"])
    start = time.perf_counter()
    metrics = evaluate_all(model, backbone, train, evals, text, cfg, args, device)
    runner.write_eval_only(cli.eval_only, args, metrics, time.perf_counter() - start, given,
                           {"config": cfg, **data.data_record(train)}, classnames_of(evals))
    print(runner.summary_line(metrics), f"-> {cli.eval_only}/metrics.json")
    return metrics


def load_run(run_dir, device="cpu", backbone=None):
    """A finished run as a `runner.Predictor`: `load_run(RUN_DIR)(images)` gives each image's class
    probabilities, the top class of each expert and the gate. Needs the run folder, the backbone
    and the class text only (the attribute banks are redrawn from the run's seed)."""
    ckpt, args = runner.load_finished_run(run_dir, Args)
    if ckpt["epoch"] < args.epochs:
        raise UserError(f"{run_dir} is unfinished (epoch {ckpt['epoch']} of {args.epochs}): finish it with --resume")
    classnames = ckpt["classnames"]
    backbone = backbone or common.load_backbone(args.backbone, device)
    class_text = ckpt["class_text"]  # the run's own: the dataset folder may have moved or changed since
    model = build_model(backbone, class_text, classnames, args, device)
    runner.load_trainable(model, ckpt["trainable"])
    S = backbone.image_size

    def experts(out, names):
        gate = "/".join(f"{g:.3f}" for g in out["gate"].tolist())
        return {"positive_expert": [names[i] for i in out["s_plus"].argmax(-1).tolist()],
                "negative_expert": [names[i] for i in out["s_minus"].argmax(-1).tolist()],
                "gate": [gate] * len(out["logits"])}
    return runner.Predictor(model, data.build_transform(S - 2 * frame_width(args, S)), classnames, device, experts)


def benchmark(args):
    """One training step on a batch (default 4) against the floor: the bare frozen image tower's
    forward and backward to the input on the 2B reprogrammed images; then inference on the batch
    against two bare forward passes. All under --precision. Random attribute banks: the text side
    is precomputed."""
    device = common.resolve_device(args.device)
    common.autocast(args.precision, device)  # refuses bf16 without CUDA before anything is loaded
    common.seed_everything(args.seed)
    backbone = common.load_backbone(args.backbone, device)
    S, B, C = backbone.image_size, args.batch_size or 4, 4
    banks = {f: F.normalize(torch.randn(args.num_attr, C, backbone.embed_dim, device=device), dim=-1)
             for f in ATTRIBUTE_SETS}
    w = frame_width(args, S)
    model = BioMedVR(S, w, backbone.mean, backbone.std, banks, backbone.logit_scale, args.topk,
                     args.gate_init, image_tower=backbone.encode_image).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    images = torch.rand(B, 3, S - 2 * w, S - 2 * w, device=device)
    labels = torch.randint(0, C, (B,), device=device)
    floor_input = torch.rand(2 * B, 3, S, S, device=device, requires_grad=True)

    def step():
        with common.autocast(args.precision, device):
            loss = compute_losses(model, images, labels, args)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def floor():
        with common.autocast(args.precision, device):
            z = backbone.encode_image(floor_input)
        z.float().sum().backward()
        floor_input.grad = None

    return runner.benchmark_report(
        device, args.precision, step, floor, lambda: model(images), lambda: backbone.encode_image(floor_input),
        B, sum(p.numel() for p in model.parameters()),
        {"method": "biomedvr", "backbone": args.backbone, "batch": B, "eval_batch": B, "classes": C})


def main(args):
    if args.benchmark:
        return benchmark(args)
    if args.eval_only:
        return eval_only(args)
    if args.predict:
        return runner.predict_cli(args, load_run)
    start = time.perf_counter()
    args, device, run, ckpt = runner.start_run(args, folder_of)
    common.seed_everything(args.seed)
    backbone, model, train, evals, text, cfg = setup(args, device)
    class_text = dict(text, classes={c: text["classes"][c] for c in train.classnames})  # kept for --predict
    loader = make_train_loader(train, backbone.image_size, args)
    optimizer, scheduler = make_optimizer(model, args, len(loader))
    print(runner.describe_trainable(model), f"{len(train.train)} training images,",
          f"{len(train.classnames)} classes, {len(loader)} steps/epoch; config {cfg}")
    first = runner.restore_training_state(ckpt, model, optimizer, scheduler) if ckpt else 1
    history = ckpt["history"] if ckpt else []  # --eval-every: test accuracy after epoch e
    eval_loaders = make_eval_loaders(evals, backbone.image_size, args)
    setup_s, train_start = time.perf_counter() - start, time.perf_counter()
    last = min(args.stop_after_epoch or args.epochs, args.epochs)
    with run.stop_on_ctrl_c():
        for epoch in range(first, last + 1):
            epoch_start = time.perf_counter()
            loader.sampler.set_epoch(epoch)  # the order and augmentations of this epoch
            stats = train_one_epoch(model, loader, optimizer, scheduler, args, device)
            gate = model.gate.detach().softmax(0).tolist()
            extra = f"gate {gate[0]:.3f}/{gate[1]:.3f}"
            if args.eval_every and epoch % args.eval_every == 0 and epoch < args.epochs:
                accuracy = evaluate(model, eval_loaders[next(iter(eval_loaders))], args, device)["accuracy"]
                history.append({"epoch": epoch, "test_accuracy": accuracy})
                extra += f" test_acc {accuracy:.2f}"
            runner.check_finite(stats, epoch)
            run.save_checkpoint(runner.training_state(model, args, epoch, optimizer, scheduler,
                                                      class_text, history))
            print(runner.epoch_line(epoch, args.epochs, stats, time.perf_counter() - epoch_start, extra), flush=True)
        if last < args.epochs:
            print(f"stopped after epoch {last} (--stop-after-epoch); continue with --resume")
            return None
        run.phase = "evaluation"
        train_s, eval_start = time.perf_counter() - train_start, time.perf_counter()
        metrics = evaluate_all(model, backbone, train, evals, text, cfg, args, device)
        if args.eval_every:  # model selection on the test set, reported apart and labelled as such
            history.append({"epoch": args.epochs, "test_accuracy": metrics.get("test", metrics.get("base"))["accuracy"]})
            best = max(history, key=lambda h: h["test_accuracy"])
            metrics["best_test_accuracy_test_selected"] = {"accuracy": best["test_accuracy"], "epoch": best["epoch"]}
        timings = {"setup_s": setup_s, "train_s": train_s, "eval_s": time.perf_counter() - eval_start}
        run.phase = "results"
        with runner.ctrl_c_held():  # metrics.json, the pictures and the finished checkpoint, all or none
            runner.write_metrics(run.path, args, metrics, timings, {
                "config": cfg, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "eval_history": history, **data.data_record(train)}, classnames_of(evals))
            save_programs_png(model, train, backbone.image_size, args, run.path / "programs.png")
            runner.finish_checkpoint(run.path)
            print(runner.summary_line(metrics), f"-> {run.path / 'metrics.json'}", flush=True)
    return metrics

if __name__ == "__main__":
    runner.run_cli(main, Args, __doc__.split("\n\n")[0])
