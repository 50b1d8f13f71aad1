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
    L = CE(logits, y) + beta L_CS (abstract)  -> `cross_entropy_loss`, `biomedvr_loss`
    confusion suppression L_CS = mean_i relu(max_c s-_ic - anchor_iy + margin),
      anchor s+_y (figure: "s+_y - s-_c > m") or the fused logit (released)  -> `confusion_suppression_loss`
    training images: resize to S-2w, random-resized crop, flip (released)  -> `transforms`
    SGD, cosine to 0 over epochs x steps per epoch (released)  -> `make_optimizer`
Ablations (Table 1's AttrVR row; the released ablation scripts), `BioMedVR(experts=, programs=, gate=)`:
    AttrVR: one program, logits = s+, CE only (`--experts positive --beta 0`); no L_CS (`--beta 0`);
    one program shared by both experts, L_CS kept (`--programs 1`, biomedvr_wo_confuse.py);
    fixed gate g = (1/2, 1/2) (`--gate fixed`); the gate's own learning rate (`--gate-lr`).

In your own code (README, "Use a method in your own code"): `attribute_banks(backbone,
descriptions, distinctive, confusions)` from one list of sentences per class, `build_model(backbone,
banks)`, then `train_step` (or `biomedvr_loss`) and `scheduler.step()` per batch. The model takes
unnormalised [0, 1] images of S - 2w pixels (`transforms(S, w)`): it adds the frame, then normalises.

The gate saturates (released behaviour, kept by default). Its two logits w share the programs' SGD
(lr 40, momentum 0.9: a step size for pixels behind a sigmoid), while dCE/dw+ = -dCE/dw- =
g+ g- mean_i(E_p[d_i] - d_iy), d = s+ - s- in logit units (CLIP's scale is 100): the first steps
move w by several units, softmax(w) reaches 1.000/0.000 (or 0.000/1.000) within the first epoch,
and there g+ g- ~ 0 stops its gradient for good. The losing expert then barely reaches the
logits (delta- still learns from L_CS); it is not broken, it is gated out. `--gate-lr` gives the
gate its own rate (same cosine): on synthetic data with the tiny backbones, 10 epochs of 4 steps,
lr 40 gives 0.000/1.000 after the first epoch on both; --gate-lr 4 gives 0.030/0.970 (tiny) and
0.549/0.451 (tiny-clip) after 10 epochs, --gate-lr 0.4 gives 0.320/0.680 and 0.390/0.610.
`--gate fixed` keeps (1/2, 1/2).

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
  * `--experts positive --beta 0` is AttrVR's method (one padding program, Des/Dist top-k scores,
    CE), trained with this file's recipe: --epochs (400; AttrVR's released scripts run 200) and the
    splits above. The class text must still hold confusion-aware attributes (they are not scored).
"""
import dataclasses
import random
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

import common
from common import UserError, arg

ATTRIBUTE_SETS = ("descriptions", "distinctive", "confusions")  # Des, Dist, Conf
PROGRAM_TITLES = {"delta_plus": "delta+ (positive)", "delta_minus": "delta- (negative)", "delta": "delta (shared)"}


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
def attribute_banks(backbone, descriptions, distinctive, confusions, num_attr: int = 20, seed: int = 1,
                    min_chars: int = 20):
    """The attribute sets Des, Dist, Conf as normalised frozen text features, each (m, C, E), m =
    num_attr. Each argument is one list of sentences per class, in class order; m are drawn per
    class and set by `sample_attributes` from random.Random(seed) (sets in this order, classes in
    order), and every distinct sentence is encoded once."""
    rng = random.Random(seed)
    drawn = {field: [sample_attributes(sentences, num_attr, rng, min_chars) for sentences in per_class]
             for field, per_class in zip(ATTRIBUTE_SETS, (descriptions, distinctive, confusions))}
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
    """The programs, the frozen attribute banks, the gate. experts="both": program delta+ for the
    positive expert and delta- for the negative one (programs=1: one program `delta` shared by
    both), mixed by the learned gate (gate="fixed": g = (1/2, 1/2), nothing trained);
    experts="positive": one program delta+ and the positive expert alone, no gate (AttrVR), where
    `programs` and `gate` are not read. The frozen image tower is passed in as a function and is
    not part of this module's state. forward(images) -> logits, s_plus, s_minus, gate (B, C), (2,);
    s_minus and gate None for the positive expert alone."""

    def __init__(self, image_size, frame, mean, std, banks, logit_scale, topk, gate_init=1.0,
                 image_tower=None, experts="both", programs=2, gate="learned"):
        super().__init__()
        if experts not in ("both", "positive") or programs not in (1, 2) or gate not in ("learned", "fixed"):
            raise ValueError(f"experts {experts!r}, programs {programs!r} or gate {gate!r} is not one of "
                             f"both|positive, 1|2, learned|fixed")
        S = image_size
        self.frame, self.logit_scale, self.topk, self.image_tower = frame, logit_scale, topk, image_tower
        self.program_names = ("delta_plus",) if experts == "positive" else (
            ("delta_plus", "delta_minus") if programs == 2 else ("delta",))
        for name in self.program_names:  # zero-initialised, as released
            setattr(self, name, nn.Parameter(torch.zeros(3, S, S)))
        if experts == "positive":
            self.gate = None
        elif gate == "learned":
            self.gate = nn.Parameter(torch.full((2,), float(gate_init)))  # w: logits of (g+, g-)
        else:
            self.register_buffer("gate", torch.zeros(2), persistent=False)  # softmax: exactly (1/2, 1/2)
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

    def programs(self):
        """The learned frames sigmoid(delta) * M, in `program_names` order: (n, 3, S, S)."""
        return torch.stack([getattr(self, name) for name in self.program_names]).sigmoid() * self.mask

    def reprogram(self, images):
        """Padding VR: (B, 3, S-2w, S-2w) in [0, 1] -> (nB, 3, S, S) normalised, one block of B per
        program (delta+ then delta-)."""
        w = self.frame
        x = F.pad(images, (w, w, w, w))  # (B, 3, S, S), zero frame
        x = (x.unsqueeze(0) + self.programs().unsqueeze(1)).flatten(0, 1)  # (n, B, 3, S, S) -> (nB, 3, S, S)
        return (x - self.mean) / self.std

    def forward(self, images):
        B = images.shape[0]
        z = self.image_tower(self.reprogram(images))  # (nB, E): one pass for every program
        with torch.autocast(z.device.type, enabled=False):  # scores in fp32 under bf16 autocast
            z = F.normalize(z.float(), dim=-1)
            z_plus, z_minus = z[:B], z[-B:]  # (B, E) each; the same rows with one shared program
            s_plus = 0.5 * (topk_score(z_plus, self.descriptions, self.logit_scale, self.topk)
                            + topk_score(z_plus, self.distinctive, self.logit_scale, self.topk))  # (B, C)
            if self.gate is None:  # the positive expert alone: its scores are the logits
                return {"logits": s_plus, "s_plus": s_plus, "s_minus": None, "gate": None}
            s_minus = topk_score(z_minus, self.confusions, self.logit_scale, self.topk)  # (B, C)
            g = self.gate.softmax(0)  # (g+, g-)
            logits = g[0] * s_plus + g[1] * s_minus  # (B, C)
        return {"logits": logits, "s_plus": s_plus, "s_minus": s_minus, "gate": g}


def frame_width(image_size: int, frame=None) -> int:
    """w: `frame`, or the released 16 pixels scaled to the backbone's input size S."""
    w = frame if frame is not None else max(1, round(16 * image_size / 224))
    if not 0 < 2 * w < image_size:
        raise UserError(f"--frame {w} does not fit a {image_size}-pixel input: use 1..{(image_size - 1) // 2}")
    return w


def build_model(backbone, banks, frame=None, topk: int = 3, gate_init: float = 1.0, experts: str = "both",
                programs: int = 2, gate: str = "learned"):
    """BioMedVR on a frozen `common.Backbone` with attribute `banks` (from `attribute_banks`): the
    programs fit the backbone's input size S, frame width w = `frame_width(S, frame)`. The model
    takes images (B, 3, S - 2w, S - 2w) in [0, 1], unnormalised (see `transforms`). `experts`,
    `programs`, `gate`: the ablations, see `BioMedVR`."""
    num_attr = banks["descriptions"].shape[0]
    if not 0 < topk <= num_attr:
        raise UserError(f"--topk {topk} must be between 1 and --num-attr {num_attr}")
    S = backbone.image_size
    return BioMedVR(S, frame_width(S, frame), backbone.mean, backbone.std, banks, backbone.logit_scale, topk,
                    gate_init, backbone.encode_image, experts, programs, gate)


# --------------------------------------------------------------------------- losses
def cross_entropy_loss(logits, labels):
    # CE(fused logits, y)
    return F.cross_entropy(logits, labels)


def confusion_suppression_loss(s_minus, anchor_scores, labels, margin: float):
    # L_CS = mean_i relu(max_c s-_{i,c} - anchor_{i,y_i} + margin); the max runs over all classes
    anchor = anchor_scores.gather(1, labels[:, None]).squeeze(1)  # (B,)
    return F.relu(s_minus.max(dim=1).values - anchor + margin).mean()


def biomedvr_loss(out, labels, beta: float = 0.3, margin: float = 0.5, cs_anchor: str = "positive"):
    """L = CE + beta L_CS from the model's output (logits, s_plus, s_minus, each (B, C)); the L_CS
    anchor is s+_y ("positive", the paper's figure) or the fused logit of y ("fused", released).
    The positive expert alone (s_minus None) has no L_CS: CE only, and beta must be 0 (ValueError)."""
    anchor = out["s_plus"] if cs_anchor == "positive" else out["logits"]
    ce = cross_entropy_loss(out["logits"], labels)
    if out["s_minus"] is None:
        if beta:
            raise ValueError(f"beta={beta}, but a model without the negative expert has no L_CS: use beta=0")
        return {"loss": ce, "ce": ce}
    cs = confusion_suppression_loss(out["s_minus"], anchor, labels, margin)
    return {"loss": ce + beta * cs, "ce": ce, "cs": cs}


# --------------------------------------------------------------------------- training recipe
def transforms(image_size: int, frame: int):
    """The released (train, test) transforms for RGB PIL images, to (3, S - 2w, S - 2w) in [0, 1]
    (the program adds the frame and normalises): resize the shorter side to S - 2w, random-resized
    crop (8-100%, bicubic), horizontal flip / resize and centre crop."""
    inner, bicubic = image_size - 2 * frame, T.InterpolationMode.BICUBIC
    return (T.Compose([T.Resize(inner, interpolation=bicubic),
                       T.RandomResizedCrop(inner, scale=(0.08, 1.0), interpolation=bicubic),
                       T.RandomHorizontalFlip(), T.ToTensor()]),
            T.Compose([T.Resize(inner, interpolation=bicubic), T.CenterCrop(inner), T.ToTensor()]))


def default_batch_size(shots: int) -> int:
    return 16 if shots == 1 else 64  # released: 64, or 16 at one shot


def make_optimizer(model, epochs: int, steps_per_epoch: int, lr: float = 40.0, momentum: float = 0.9,
                   gate_lr=None):
    """SGD on the programs and the gate (no weight decay), cosine annealing to 0 over every
    iteration (call scheduler.step() after each step). `gate_lr`: the learned gate's own rate, in
    a parameter group of its own (annealed alike); None: `lr` for all, as released."""
    params = [p for p in model.parameters() if p.requires_grad]
    if gate_lr is not None:
        if not isinstance(model.gate, nn.Parameter):
            raise ValueError("gate_lr is the learned gate's rate, and this model learns no gate")
        params = [{"params": [p for p in params if p is not model.gate]}, {"params": [model.gate], "lr": gate_lr}]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch, eta_min=0.0)
    return optimizer, scheduler


def train_step(model, images, labels, optimizer, precision="fp32", **loss_options):
    """One SGD step on L = CE + beta L_CS (`loss_options` go to `biomedvr_loss`): images
    (B, 3, S - 2w, S - 2w) in [0, 1], labels (B,). Returns the logged loss terms and the logits."""
    with common.autocast(precision, images.device):
        out = model(images)
        terms = biomedvr_loss(out, labels, **loss_options)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}, out["logits"].detach()


def train_one_epoch(model, batches, optimizer, scheduler, device, precision="fp32", **loss_options):
    """One pass over `batches` of (images, labels), the scheduler stepped every iteration: the mean
    of each loss term, the training accuracy (%) and the last step's learning rate."""
    model.train()
    sums, correct, seen = {}, 0, 0
    for images, labels in tqdm(batches, desc="train", leave=False, disable=None):
        images, labels = images.to(device), labels.to(device)
        terms, logits = train_step(model, images, labels, optimizer, precision, **loss_options)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    return {**{k: v / seen for k, v in sums.items()}, "train_accuracy": 100 * correct / seen, "lr": lr}


@torch.no_grad()
def evaluate(model, batches, device, precision="fp32"):
    """Classification metrics (common.classification_metrics) on `batches` of (images, labels)."""
    model.eval()
    logits, labels = [], []
    for images, y in tqdm(batches, desc="evaluate", leave=False, disable=None):
        with common.autocast(precision, device):
            logits.append(model(images.to(device))["logits"].float().cpu())
        labels.append(y)
    return common.classification_metrics(torch.cat(logits), torch.cat(labels), model.descriptions.shape[1])


@torch.no_grad()
def draw_programs(model, images, titles, fig):
    """Into a matplotlib Figure: each learned frame alone (first column), then `images`
    (n, 3, S - 2w, S - 2w) as the frozen image tower sees them under it, a row per program."""
    seen = model.reprogram(images.to(model.mask.device)) * model.std + model.mean  # (pn, 3, S, S) in [0, 1]
    frames = model.programs()  # (p, 3, S, S)
    n = len(images)
    axes = fig.subplots(len(frames), n + 1, squeeze=False)
    for row, expert in enumerate(PROGRAM_TITLES[name] for name in model.program_names):
        panels = [frames[row]] + [seen[row * n + i] for i in range(n)]
        for ax, image, title in zip(axes[row], panels, ["frame alone"] + list(titles)):
            ax.imshow(image.clamp(0, 1).permute(1, 2, 0).cpu().numpy())  # (S, S, 3)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title if row == 0 else "", fontsize=7)
        axes[row, 0].set_ylabel(expert, fontsize=8)
    return fig


# =========================================================================== command line
@dataclasses.dataclass
class Args:  # the method's knobs; runner.py adds the experiment (--dataset, --shots, --seed,
    # --subsample, --backbone) and the run flags (--eval-only, --resume, --device, --out, ...)
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
    experts: str = arg("both", "both: the positive and the negative expert, gated; positive: the positive expert "
                       "alone, one program, no gate (with --beta 0: AttrVR as released)", ["both", "positive"])
    programs: int = arg(2, "programs: 2 (delta+, delta-), or 1 shared by both experts (the released "
                        "biomedvr_wo_confuse.py ablation)", [1, 2])
    gate: str = arg("learned", "learned: g = softmax(w), w trained; fixed: g = (1/2, 1/2), nothing trained",
                    ["learned", "fixed"])
    # optimisation
    epochs: int = arg(400, "training epochs (official: 400)", at_least=1)
    batch_size: int = arg(None, "batch size; none = 64, or 16 at one shot (official)", at_least=1)
    lr: float = arg(40.0, "SGD learning rate, cosine to 0 per iteration (official: 40)", above=0)
    momentum: float = arg(0.9, "SGD momentum (official: 0.9; no weight decay)", at_least=0, below=1)
    gate_lr: float = arg(None, "the gate's own learning rate, cosine alike; none: --lr, as released (which "
                         "saturates the gate within the first epoch: see the docstring)", above=0)
    # evaluation
    eval_every: int = arg(0, "also evaluate the test set every N epochs (0: only at the end); "
                          "the best of these is reported as test-selected", at_least=0, resume_may_differ=True)

    def check(self):
        """Flags that contradict each other (the run machinery calls this with the range checks)."""
        if self.experts == "positive":
            given = [flag for flag, on in (("--beta > 0", self.beta > 0), ("--programs 1", self.programs == 1),
                                           ("--gate fixed", self.gate == "fixed"), ("--gate-lr", self.gate_lr))
                     if on]
            if given:
                raise UserError(f"--experts positive has one program, no gate and no confusion-suppression loss: "
                                f"leave out {', '.join(given)} (with --beta 0 it is AttrVR)")
        elif self.gate == "fixed" and self.gate_lr is not None:
            raise UserError("--gate fixed trains no gate, so --gate-lr has nothing to set: leave one out")


# What the run machinery (runner.py: run folders, resume, --eval-only, --predict, --benchmark)
# calls; a method copied into another project needs none of it.
NAME = "biomedvr"  # the class text it reads: descriptions, distinctive, confusions
TRAINABLE_GROUPS = ()


def run_name(args) -> str:
    """biomedvr[-fused] and a suffix per ablation switch off its default (run.sh's method_dir says
    the same), so that an ablation never shares a run folder with the full method."""
    name = "biomedvr" if args.cs_anchor == "positive" else "biomedvr-fused"
    name += "-positive" if args.experts == "positive" else ""
    name += "-shared-program" if args.programs == 1 else ""
    name += "-fixed-gate" if args.gate == "fixed" else ""
    name += f"-gate-lr{args.gate_lr:g}" if args.gate_lr is not None else ""
    return name + ("-no-cs" if args.beta == 0 else "")


def configure(args, backbone, class_text) -> dict:
    """The resolved frame width and batch size, and the epochs."""
    return {"frame": frame_width(backbone.image_size, args.frame),
            "batch_size": args.batch_size or default_batch_size(args.shots), "epochs": args.epochs}


def input_size(args, backbone) -> int:
    return backbone.image_size - 2 * frame_width(backbone.image_size, args.frame)


def transforms_for(args, backbone):
    return transforms(backbone.image_size, frame_width(backbone.image_size, args.frame))


def loader_settings(cfg, args) -> dict:
    return {"batch_size": cfg["batch_size"], "test_batch_size": cfg["batch_size"], "drop_last": False}


def build(backbone, classnames, class_text, cfg, args, support=None):
    """The model for `classnames`, its attribute banks drawn with the run's seed (so evaluation and
    prediction redraw the training banks)."""
    banks = class_banks(backbone, class_text, classnames, args)
    return build_model(backbone, banks, cfg["frame"], args.topk, args.gate_init, args.experts, args.programs,
                       args.gate)


def class_banks(backbone, class_text, classnames, args):
    classes = class_text["classes"]
    sets = {field: [classes[c][field] for c in classnames] for field in ATTRIBUTE_SETS}
    return attribute_banks(backbone, **sets, num_attr=args.num_attr, seed=args.seed, min_chars=args.min_chars)


def loss_options(args) -> dict:
    return {"beta": args.beta, "margin": args.margin, "cs_anchor": args.cs_anchor}


def make_optimizer_for(model, cfg, args, steps_per_epoch):
    return make_optimizer(model, args.epochs, steps_per_epoch, args.lr, args.momentum, args.gate_lr)


def train_epoch(model, loader, optimizer, scheduler, cfg, args, device):
    return train_one_epoch(model, loader, optimizer, scheduler, device, args.precision, **loss_options(args))


def after_epoch(model, epoch, cfg, args, device, test_loader):
    """The gate on the epoch line; with --eval-every, the test accuracy (a record for the history)."""
    gate = gate_values(model)
    extra, record = f"gate {gate[0]:.3f}/{gate[1]:.3f}" if gate else "", None
    if args.eval_every and epoch % args.eval_every == 0 and epoch < args.epochs:
        accuracy = evaluate(model, test_loader, device, args.precision)["accuracy"]
        record = {"epoch": epoch, "test_accuracy": accuracy}
        extra += f" test_acc {accuracy:.2f}"
    return extra.strip(), record


def gate_values(model):
    """(g+, g-) as floats; None for the positive expert alone."""
    return None if model.gate is None else model.gate.detach().softmax(0).tolist()


def evaluate_run(model, backbone, evals, loaders, class_text, cfg, args, device, perturbed=None):
    """{"test"} or {"base", "novel", "harmonic_mean"}, plus the gate (g+, g-) where there is one.
    Novel classes: the same programs and gate with attribute banks drawn for the novel class names."""
    gate = {"gate": gate_values(model)} if model.gate is not None else {}
    if args.subsample != "base":
        return {"test": evaluate(model, loaders["test"], device, args.precision), **gate}
    metrics = {"base": evaluate(model, loaders["base"], device, args.precision)}
    model.set_attributes(class_banks(backbone, class_text, evals["novel"].classnames, args))
    metrics["novel"] = evaluate(model, loaders["novel"], device, args.precision)
    metrics["harmonic_mean"] = common.harmonic_mean(metrics["base"]["accuracy"], metrics["novel"]["accuracy"])
    return {**metrics, **gate}


def final_metrics(metrics, history, cfg, args):
    """With --eval-every: the best test accuracy over the evaluated epochs, labelled as selected on
    the test set (the released code's number)."""
    if args.eval_every:
        history.append({"epoch": args.epochs, "test_accuracy": metrics.get("test", metrics.get("base"))["accuracy"]})
        best = max(history, key=lambda h: h["test_accuracy"])
        metrics["best_test_accuracy_test_selected"] = {"accuracy": best["test_accuracy"], "epoch": best["epoch"]}
    return metrics


def pictures(model, examples, cfg, args, new_figure) -> dict:
    """programs.png: the learned frames and a few training images under them."""
    images, titles = examples()
    size = (1.5 * (len(titles) + 1), 1.65 * len(model.program_names))
    return {"programs.png": draw_programs(model, images, titles, new_figure(*size))}


def prediction_extras(out, classnames) -> dict:
    """Per image: the top class of each expert, and the gate (the positive expert alone: its class)."""
    extras = {"positive_expert": [classnames[i] for i in out["s_plus"].argmax(-1).tolist()]}
    if out["gate"] is not None:
        gate = "/".join(f"{g:.3f}" for g in out["gate"].tolist())
        extras.update(negative_expert=[classnames[i] for i in out["s_minus"].argmax(-1).tolist()],
                      gate=[gate] * len(out["logits"]))
    return extras


def benchmark_parts(args, backbone, device, class_text) -> dict:
    """One training step on a batch (default 4) against the floor: the bare frozen image tower's
    forward and backward to the input on the nB reprogrammed images (n programs); then inference
    on the batch against the bare forward pass. Random attribute banks: the text side is precomputed."""
    S, B, C = backbone.image_size, args.batch_size or 4, 4
    banks = {f: F.normalize(torch.randn(args.num_attr, C, backbone.embed_dim, device=device), dim=-1)
             for f in ATTRIBUTE_SETS}
    w = frame_width(S, args.frame)
    model = build_model(backbone, banks, w, args.topk, args.gate_init, args.experts, args.programs,
                        args.gate).to(device)
    optimizer, _ = make_optimizer(model, 1, 1, args.lr, args.momentum, args.gate_lr)
    images = torch.rand(B, 3, S - 2 * w, S - 2 * w, device=device)
    labels = torch.randint(0, C, (B,), device=device)
    floor_input = torch.rand(len(model.program_names) * B, 3, S, S, device=device, requires_grad=True)

    def step():
        train_step(model, images, labels, optimizer, args.precision, **loss_options(args))

    def floor():
        with common.autocast(args.precision, device):
            z = backbone.encode_image(floor_input)
        z.float().sum().backward()
        floor_input.grad = None

    return {"step": step, "floor": floor, "infer": lambda: model(images),
            "infer_floor": lambda: backbone.encode_image(floor_input), "eval_images": B,
            "trainable_parameters": sum(p.numel() for p in model.parameters()),
            "extra": {"method": "biomedvr", "backbone": args.backbone, "batch": B, "eval_batch": B, "classes": C}}


def main(argv=None):
    import runner  # the run machinery lives outside the method, so that this file and common.py stand alone
    return runner.run_method(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
