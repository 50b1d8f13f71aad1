"""BiomedAP: prompt learning with gated cross-modal fusion and dual anchors.

Paper: Tong, Liu, Kuang, Chen, "BiomedAP: A Vision-Informed Dual-Anchor Framework with Gated
Cross-Modal Fusion for Robust Medical Vision-Language Adaptation", CVPR 2026 Workshops,
arXiv 2605.15736. Official code: github.com/tongdiedie/BiomedAP (f7137a5).

Idea: learn a text context (CoOp-style, initialised from a clinical template) and visual prompt
tokens for a frozen BiomedCLIP; at two mid/late image blocks a gated bidirectional cross-attention
mixes the text context into the visual prompt tokens; the learned class prompts are pulled towards
a "high" anchor (expert descriptions) and a "low" anchor (few-shot visual prototypes / "{class}").

Symbols: B batch, C classes, M context tokens (n_ctx), P visual prompt tokens (4), N patches,
D image width, Dt text width, Du attention width max(D, Dt), E joint embedding width, K shots.

Equation map. Only the paper's abstract and method figure (Fig. 1 in the repository README) could
be read; each line names the figure's block (or the abstract), then the code:
    learnable context "a [MODALITY] photo of a" + class name (Fig. 1, text)  -> `PromptLearner`
    visual prompts: zeros (released) / deep VPT (Fig. 1, image)  -> `official_prompts`, `paper_prompts`
    Gated Cross-Modal Prompt Fusion, "Unified Interaction Space" (Fig. 1)  -> `GatedFusion.forward`
    text context: GT class in training, mean of classes at inference (Fig. 1)  -> `BiomedAP.forward`
    High Anchors: centroid of expert prompts (abstract, Fig. 1)  -> `high_anchor`
    Low Anchors: few-shot visual prototypes (abstract; "{class}" released)  -> `low_anchor`
    logits s f t^T and anchor logits s f h^T (released code)  -> `BiomedAP.forward`
    L_ce, L1 to each anchor, KL to the anchor logits, alignment  -> `anchor_l1`, `anchor_kl`, `alignment_loss`
    Confidence-Aware Adaptive Loss, w = 1 + alpha H(p)/log C (abstract, Fig. 1)  -> `confidence_weight`
    L = L_ce + w (L_high + L_low + L_kl) + L_align  -> `train_step`

Prompt perturbations (`--robustness`, ours: deviation 12): the learned context keeps positions
1..M and the rest of the prompt (the "fixed part") is replaced. "clinical" is the trained prompt;
"descriptive" appends the class's first expert description; "typo" substitutes about 20% of the
non-space characters of the template after ctx_init (class name kept, seeded by the template);
"generic" ("a photo of a {}."), "article" ("a {}.") and "minimal" ("{}") follow the context whole:
[start] ctx "a {class}." [end] (on synthetic, whose template is the generic one, generic =
clinical). The image features do not depend on the fixed part: computed once, re-scored.

Deviations (from the paper, the official code, or both):
  1. `--variant official` keeps the released behaviour: fixed zero prompts overwrite patches 1..P
     before every block, the fusion is fed those fresh zeros (so its tokens are image-independent),
     "{class}" low anchor, plain sum, KL teacher not detached. `--variant paper` (default) follows
     the text: learnable prompts inserted after CLS (1+P+N tokens, VPT's uniform init) and replaced
     before each block; the fusion takes the prompt tokens' hidden states from the previous block
     (at block 0 the learnable prompt), and blocks fed by the fusion own no prompt (it would be
     unused); low anchor = few-shot visual prototypes; the confidence weight scales L_high, L_low
     and L_kl (the three terms pulling towards an anchor); KL teacher detached (it is a target).
  2. Frozen encoders always run in eval mode (official: BERT dropout active in training). Zero
     prompts are a non-persistent buffer without the official Dropout(0.5) (a no-op on zeros).
  3. Class token at the end in both protocols (the official base-to-novel drivers fell back to the
     buggy `middle`); n_ctx from the per-dataset yaml in both.
  4. Inference never takes labels (the official code uses them when given, an 'oracle'); the
     default context is the mean over classes (identical numbers with a class-shared context).
  5. Anchors are computed once with the same frozen model (official: a second BiomedCLIP); they
     are training-only, so evaluation models (novel classes, perturbed prompts) carry none.
  6. Prompts go through the text tower trimmed to their real length (identical under the mask).
  7. A missing checkpoint is an error (the official code silently evaluated an untrained model).
  8. Attention uses 8 heads, or the largest count <= 8 dividing Du (official: 8). Where D != Dt, as
     official, only the attentions run at Du (the narrower stream projected in and back), the rest
     at each stream's width: 13,190,400 parameters a module at 768/512, 15,353,856 at 768/768.
  9. Fusion blocks 5 and 8 are for a 12-block tower; other depths use round(i * depth / 12).
 10. Synthetic data and your own folders use the official global defaults (lambda 12.5/0.25/0.3,
     align 0.1 as in every yaml, epochs 100 / 50, n_ctx = all ctx_init tokens).
 11. Base-to-novel reports the true harmonic mean (the official table's "HM" is arithmetic).
 12. The robustness protocol above is ours: the released code has none.
 13. Random draws are not Dassl's (global streams, seeded per worker): each epoch's order and each
     image's crop follow from (seed, epoch, image index) alone, so `--workers` changes no number.
 14. Images are decoded as a viewer shows them (`data.to_rgb`: EXIF orientation, alpha composited
     on white, 16-bit/float stretched; one-colour or over 20:1 images refused); official: PIL's
     convert("RGB"). The pixels are the same for 8-bit RGB/grey files without an EXIF orientation.
"""
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import runner
from common import UserError
from runner import arg, list_arg

# Official per-dataset configuration (configs/trainers/BiomedAP/*): n_ctx, few-shot and
# base-to-novel (lambda_high, lambda_kl, lambda_low). Hyper-parameters, not code.
OFFICIAL = {
    "btmri": (5, (12.5, 0.25, 3.0), (25.0, 0.5, 2.0)),
    "busi": (5, (18.75, 1.0, 1.0), (18.75, 0.65, 1.5)),
    "chmnist": (5, (12.5, 0.5, 3.0), (42.3, 0.7, 24.6)),
    "covid": (6, (65.0, 2.5, 5.0), (18.75, 0.5, 0.3)),
    "ctkidney": (5, (18.75, 0.25, 5.0), (25.0, 1.0, 5.0)),
    "dermamnist": (5, (25.0, 20.0, 15.0), (25.3, 2.9, 1.4)),
    "kneexray": (6, (25.0, 10.0, 10.0), (27.2, 1.7, 7.8)),
    "kvasir": (5, (25.0, 0.75, 1.0), (10.0, 0.5, 5.0)),
    "lungcolon": (5, (12.5, 0.25, 1.0), (9.5, 1.0, 3.0)),
    "octmnist": (5, (12.5, 0.25, 1.0), (12.5, 0.5, 1.5)),
    "retina": (4, (10.5, 0.25, 1.0), (22.0, 0.4, 5.0)),
}
GLOBAL_LAMBDAS = (12.5, 0.25, 0.3)   # train.py defaults (lambda_high, lambda_kl, lambda_low)
LAMBDA_ALIGN = 0.1                   # every yaml: ALIGNMENT_LAMBDA
EPOCHS = {"all": 100, "base": 50}    # MAX_EPOCH few-shot / base-to-novel
N_PROMPTS = {"all": 40, "base": 50}  # expert descriptions per class in the high anchor
REFERENCE_DEPTH, REFERENCE_FUSION = 12, (5, 8)  # the paper's blocks 5 and 8 of a 12-block ViT


@dataclasses.dataclass
class Args(runner.RunArgs):  # + the run flags (--eval-only, --resume, --device, --out, ...)
    dataset: str = arg("btmri", "benchmark (btmri, busi, ...), synthetic, or your own folder of class sub-folders")
    shots: int = arg(16, "K labelled training images per class", at_least=1)
    seed: int = arg(1, "seed of the few-shot subset, the initialisation and the data order", at_least=0)
    subsample: str = arg("all", "all: few-shot on every class; base: train on base classes, test base and novel",
                         ["all", "base"])
    backbone: str = arg("biomedclip", "frozen backbone: biomedclip, clip, hf-hub:ORG/REPO, local-dir:PATH, tiny")
    # the method (official configs/trainers/BiomedAP defaults)
    variant: str = arg("paper", "paper: the method as published; official: the released code's behaviour",
                       ["paper", "official"])
    n_ctx: int = arg(None, "M context tokens; none: official per-dataset value, else all ctx_init tokens", at_least=1)
    n_prompts: int = arg(None, "expert descriptions per class in the high anchor; none: 40, b2n 50", at_least=1)
    prompt_tokens: int = arg(4, "P visual prompt tokens (official 4)", at_least=1)
    fusion_layers: list = list_arg(int, "blocks that get the gated fusion (0-based); none given: 5 and 8 of 12, "
                                        "scaled to the depth", metavar="BLOCK")
    fusion_heads: int = arg(8, "heads of the fusion cross-attention (official 8)", at_least=1)
    fusion_dropout: float = arg(0.1, "dropout in the fusion attention and feed-forward (official 0.1)",
                                at_least=0, below=1)
    lambda_high: float = arg(None, "weight of L1 to the high anchor; none: official per-dataset table", at_least=0)
    lambda_kl: float = arg(None, "weight of KL to the anchor logits; none: official per-dataset table", at_least=0)
    lambda_low: float = arg(None, "weight of L1 to the low anchor; none: official per-dataset table", at_least=0)
    lambda_align: float = arg(None, "weight of the fusion alignment loss; none: official 0.1", at_least=0)
    alpha: float = arg(1.0, "confidence-aware weight w = 1 + alpha * normalised entropy (paper variant)",
                       at_least=0)
    # optimisation
    epochs: int = arg(None, "training epochs; none: official 100 few-shot, 50 base-to-novel", at_least=1)
    batch_size: int = arg(4, "training batch size (official 4)", at_least=1)
    lr: float = arg(0.0025, "SGD learning rate, cosine per epoch (official)", above=0)
    warmup_lr: float = arg(1e-5, "constant learning rate of the one warm-up epoch (official)", above=0)
    momentum: float = arg(0.9, "SGD momentum (official)", at_least=0, below=1)
    weight_decay: float = arg(5e-4, "SGD weight decay (official)", at_least=0)
    # evaluation
    test_batch_size: int = arg(100, "evaluation batch size (official 100)", at_least=1, resume_may_differ=True,
                               eval_option=True)
    infer_context: str = arg("mean", "text context the fusion sees at test time", ["mean", "per-class"],
                             resume_may_differ=True, eval_option=True)
    robustness: bool = arg(False, "also evaluate under prompt perturbations (see the docstring)",
                           resume_may_differ=True, eval_option=True)


# --------------------------------------------------------------------------- text prompt learner
class PromptLearner(nn.Module):
    """[start] ctx_1..ctx_M <class name and rest of the clinical template> [end], one context
    shared by all classes, initialised from the word embeddings of ctx_init."""

    def __init__(self, backbone, classnames, template, ctx_init, n_ctx):
        super().__init__()
        self.backbone, self.n_ctx = backbone, n_ctx
        init = backbone.tokenize([ctx_init])[0]                           # [start] w_1..w_k [end]
        words = int((init != backbone.pad_id).sum()) - 2
        if not 1 <= n_ctx <= words:
            raise UserError(f"n_ctx={n_ctx} but ctx_init {ctx_init!r} has {words} tokens here; "
                            f"pass --n-ctx between 1 and {words}")
        ids = backbone.tokenize([template.format(c) for c in classnames])  # (C, L)
        if not (ids[:, 1:1 + n_ctx] == init[1:1 + n_ctx]).all():
            raise UserError(f"template {template!r} does not start with ctx_init {ctx_init!r} "
                            f"after tokenisation; the context would overwrite other words")
        with torch.no_grad():
            embeds = backbone.token_embedding(ids).float()               # (C, L, Dt)
        self.ctx = nn.Parameter(embeds[0, 1:1 + n_ctx].clone())          # (M, Dt)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("embeds", embeds, persistent=False)

    def fixed_part(self, sentences):
        """Ids and word embeddings of one perturbed sentence per class, laid out around the
        context as described in the module docstring: (C, L'), (C, L', Dt)."""
        bb, M = self.backbone, self.n_ctx
        ids = bb.tokenize(sentences)
        rows = []
        for c, row in enumerate(ids):
            row = row[:int((row != bb.pad_id).nonzero().max()) + 1]      # its real length
            if not torch.equal(row[1:1 + M], self.ids[c, 1:1 + M]):      # insert M context slots
                row = torch.cat([row[:1], self.ids[c, 1:1 + M], row[1:]])
            rows.append(row)
        length = max(len(r) for r in rows)
        limit = getattr(bb.tokenizer, "context_length", length)
        if length > limit:
            raise UserError(f"a perturbed prompt has {length} tokens, over the text tower's {limit}")
        ids = torch.stack([F.pad(r, (0, length - len(r)), value=bb.pad_id) for r in rows])  # (C, L')
        with torch.no_grad():
            return ids, bb.token_embedding(ids).float()

    def forward(self, embeds=None):
        """Prompt word embeddings with the learned context at positions 1..M: (C, L, Dt)."""
        embeds = self.embeds if embeds is None else embeds
        ctx = self.ctx.unsqueeze(0).expand(len(embeds), -1, -1)           # (C, M, Dt)
        return torch.cat([embeds[:, :1], ctx, embeds[:, 1 + self.n_ctx:]], dim=1)

    def class_context(self):
        """The context slice of each class prompt, the fusion's text input: (C, M, Dt)."""
        return self()[:, 1:1 + self.n_ctx]


# --------------------------------------------------------------------------- gated fusion
def heads_for(width, wanted):
    return max(h for h in range(1, wanted + 1) if width % h == 0)


class GatedFusion(nn.Module):
    """Gated bidirectional cross-attention between visual prompts P_v (B, P, D) and the text context
    P_t (B, M, Dt) (Fig. 1's GCPF; released
    trainers/cross_modal_fusion.py). Only the attentions run at Du = max(D, Dt), the narrower stream
    projected in (Pi) and back (Po); the rest works at each stream's own width, as official:
        dP_v = Po_v MHA(Pi_v P_v, Pi_t P_t, Pi_t P_t)     dP_t = Po_t MHA(Pi_t P_t, Pi_v P_v, Pi_v P_v)
        g_v = sigmoid(W_gv P_v + b)                       g_t = sigmoid(W_gt P_t + b)
        F_v = g_v * P_v + (1 - g_v) * dP_v                F_t likewise
        Y_v = LN(P_v + F_v)                               out_v = Y_v + FFN(Y_v), likewise for t."""

    def __init__(self, visual_width, text_width, heads=8, dropout=0.1):
        super().__init__()
        width = max(visual_width, text_width)
        proj = lambda a, b: nn.Linear(a, b) if a != b else nn.Identity()  # noqa: E731
        self.v_in, self.t_in = proj(visual_width, width), proj(text_width, width)
        self.v_out, self.t_out = proj(width, visual_width), proj(width, text_width)
        heads = heads_for(width, heads)
        self.attn_v = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)  # v <- t
        self.attn_t = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)  # t <- v
        self.gate_v, self.gate_t = nn.Linear(visual_width, visual_width), nn.Linear(text_width, text_width)
        self.norm_v, self.norm_t = nn.LayerNorm(visual_width), nn.LayerNorm(text_width)
        ffn = lambda d: nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout),  # noqa: E731
                                      nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.ffn_v, self.ffn_t = ffn(visual_width), ffn(text_width)

    def forward(self, p_v, p_t):
        u_v, u_t = self.v_in(p_v), self.t_in(p_t)                          # (B, P, Du), (B, M, Du)
        d_v = self.v_out(self.attn_v(u_v, u_t, u_t, need_weights=False)[0])  # (B, P, D)
        d_t = self.t_out(self.attn_t(u_t, u_v, u_v, need_weights=False)[0])  # (B, M, Dt)
        g_v, g_t = torch.sigmoid(self.gate_v(p_v)), torch.sigmoid(self.gate_t(p_t))
        y_v = self.norm_v(p_v + g_v * p_v + (1 - g_v) * d_v)
        y_t = self.norm_t(p_t + g_t * p_t + (1 - g_t) * d_t)
        return y_v + self.ffn_v(y_v), y_t + self.ffn_t(y_t)


def default_fusion_layers(depth):
    return sorted({round(i * depth / REFERENCE_DEPTH) for i in REFERENCE_FUSION})


# --------------------------------------------------------------------------- the model
class BiomedAP(nn.Module):
    """The prompted model: learned text context, visual prompts, GatedFusion at `fusion_layers`, and
    the two frozen anchors. forward(images (B, 3, H, W), context (B, M, Dt) or None) returns on every
    branch: logits (B, C), image_features (B, E), or (B, C, E) per class, text_features (C, E),
    fused_text [(B, M, Dt)], context, anchor_logits (B, C): the high anchor's logits of the same
    image features (None without anchors: a model for evaluation or prediction cannot train)."""

    def __init__(self, backbone, classnames, template, ctx_init, n_ctx, variant="paper",
                 prompt_tokens=4, fusion_layers=(), heads=8, dropout=0.1, infer_context="mean",
                 high_anchor=None, low_anchor=None):
        super().__init__()
        self.backbone, self.variant, self.infer_context = backbone, variant, infer_context
        depth, width = backbone.num_blocks, backbone.image_width
        self.fusion_layers = list(fusion_layers) or default_fusion_layers(depth)
        layers = self.fusion_layers
        if any(not 0 <= i < depth for i in layers) or len(set(layers)) != len(layers):
            raise UserError(f"--fusion-layers must be distinct block indices in 0..{depth - 1}")
        self.prompt_learner = PromptLearner(backbone, classnames, template, ctx_init, n_ctx)
        self.fusion = nn.ModuleList(GatedFusion(width, backbone.text_width, heads, dropout)
                                    for _ in self.fusion_layers)
        self.P = prompt_tokens
        if variant == "official":   # fixed zero tokens, never trained
            self.register_buffer("zero_prompt", torch.zeros(1, prompt_tokens, width), persistent=False)
        else:                       # deep VPT: block 0 and every block without fusion owns one
            self.prompt_blocks = [i for i in range(depth) if i == 0 or i not in self.fusion_layers]
            self.visual_prompts = nn.Parameter(torch.empty(len(self.prompt_blocks), prompt_tokens, width))
            bound = math.sqrt(6 / (prompt_tokens + width))  # VPT's uniform init
            nn.init.uniform_(self.visual_prompts, -bound, bound)
        self.register_buffer("high_anchor", high_anchor, persistent=False)  # (C, E) or None
        self.register_buffer("low_anchor", low_anchor, persistent=False)    # (C, E) or None

    def text_features(self, embeds=None, ids=None):
        """Normalised features of the learned class prompts (or of a perturbed fixed part): (C, E)."""
        pl = self.prompt_learner
        ids = pl.ids if ids is None else ids
        return F.normalize(self.backbone.text_from_embeddings(pl(embeds), ids).float(), dim=-1)

    def official_prompts(self, i, h, context):
        """Released code: P fixed zero tokens overwrite patches 1..P before every block; at a fusion
        block the zeros are what is fused with the text context, so the result ignores the image."""
        zeros = self.zero_prompt.expand(h.shape[0], -1, -1)              # (B, P, D)
        return self.fuse(i, zeros, context) if i in self.fusion_layers else (zeros, None)

    def paper_prompts(self, i, h, context):
        """Paper: deep visual prompts after CLS. A fusion block fuses the prompt tokens' hidden states
        from the previous block with the text context (vision-informed prompts); every other
        block replaces them with its own learnable prompts (VPT-deep)."""
        if i in self.fusion_layers:
            return self.fuse(i, h[:, 1:1 + self.P], context)
        return self.visual_prompts[self.prompt_blocks.index(i)].expand(h.shape[0], -1, -1), None

    def fuse(self, i, visual_prompts, context):
        """Block i's gated fusion: (B, P, D), (B, M, Dt) -> fused visual prompts, enhanced text context."""
        return self.fusion[self.fusion_layers.index(i)](visual_prompts, context)

    def encode_image(self, images, context):
        """Prompted, fused image tower: images (B, 3, H, W), context (B, M, Dt) ->
        normalised features (B, E) and the fusion's enhanced text contexts [(B, M, Dt)]."""
        bb, P = self.backbone, self.P
        h = bb.image_tokens(images)                                       # (B, 1+N, D)
        if self.variant == "paper":                                       # P prompt slots after CLS
            h = torch.cat([h[:, :1], self.visual_prompts[0].expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
        block_prompts = self.paper_prompts if self.variant == "paper" else self.official_prompts
        fused_text = []
        for i in range(bb.num_blocks):
            v, t = block_prompts(i, h, context)                           # (B, P, D), (B, M, Dt) or None
            if t is not None:
                fused_text.append(t)
            h = torch.cat([h[:, :1], v.to(h.dtype), h[:, 1 + P:]], dim=1)  # (B, L, D)
            h = bb.image_block(h, i)
        return F.normalize(bb.image_head(h).float(), dim=-1), fused_text

    def forward(self, images, context=None, text_features=None):
        """Logits and what the losses need. No labels: training passes the label-indexed
        context (B, M, Dt); at inference (context None) the fusion sees the mean over classes,
        or each class's own context with `infer_context="per-class"` (C image passes)."""
        text = self.text_features() if text_features is None else text_features    # (C, E)
        scale = self.backbone.logit_scale
        class_ctx = self.prompt_learner.class_context()                            # (C, M, Dt)
        B = images.shape[0]
        if context is None and self.infer_context == "per-class":
            feats = torch.stack([self.encode_image(images, class_ctx[c].expand(B, -1, -1))[0]
                                 for c in range(len(class_ctx))], dim=1)           # (B, C, E)
            logits = scale * torch.einsum("bce,ce->bc", feats, text)
            return {"logits": logits, "image_features": feats, "text_features": text, "fused_text": [],
                    "context": class_ctx, "anchor_logits": None}
        if context is None:
            context = class_ctx.mean(0, keepdim=True).expand(B, -1, -1)           # (B, M, Dt)
        feats, fused_text = self.encode_image(images, context)
        out = {"logits": scale * feats @ text.t(), "image_features": feats, "text_features": text,
               "fused_text": fused_text, "context": context, "anchor_logits": None}
        if self.high_anchor is not None:  # zero-shot logits of the same prompted image features
            out["anchor_logits"] = scale * feats @ self.high_anchor.t()
        return out


# --------------------------------------------------------------------------- anchors
def high_anchor(backbone, class_text, classnames, n_prompts):
    """h_c = norm(mean_m norm(E_T(description_{c,m}))) over the first n_prompts descriptions: (C, E)."""
    return common.class_centroids(backbone, [class_text["classes"][c]["descriptions"][:n_prompts] for c in classnames])


@torch.no_grad()
def low_anchor(backbone, variant, classnames, support=None):
    """official: l_c = norm(E_T("{class}")); paper: the few-shot visual prototype
    l_c = norm(mean_k norm(E_I(x_{c,k}))) of the frozen, unprompted image tower, from `support`
    batches (images, labels) of the K support images with the test transform: (C, E)."""
    if variant == "official":
        return common.encode_sentences(backbone, list(classnames))
    feats = torch.zeros(len(classnames), backbone.embed_dim, device=backbone.device)
    for images, labels in support:
        f = F.normalize(backbone.encode_image(images.to(backbone.device)).float(), dim=-1)  # (B, E)
        feats.index_add_(0, labels.to(feats.device), f)
    return F.normalize(feats, dim=-1)


# --------------------------------------------------------------------------- losses
def anchor_l1(text_features, anchor):
    # L_high / L_low: mean element-wise |t - a| over the (C, E) normalised features
    return (text_features - anchor).abs().mean()


def anchor_kl(logits, anchor_logits, detach_teacher):
    # L_kl: KL(softmax(z) || softmax(logits)), summed and divided by B*C (official form)
    teacher = anchor_logits.detach() if detach_teacher else anchor_logits
    return F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                    reduction="sum") / logits.numel()


def alignment_loss(fused_text, context):
    # L_align: mean over fusion layers of 1 - mean_b cos(mean_M(P~_t), mean_M(P_t))
    terms = [1 - F.cosine_similarity(t.mean(1), context.mean(1), dim=-1).mean() for t in fused_text]
    return torch.stack(terms).mean() if terms else context.new_zeros(())


def confidence_weight(logits, alpha):
    # w = 1 + alpha * mean_b H(p_b) / log C, detached: uncertain batches lean on the anchors
    logp = logits.detach().float().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1) / math.log(max(logits.shape[-1], 2))
    return 1 + alpha * entropy.mean()


# --------------------------------------------------------------------------- training step
def train_step(model, images, labels, optimizer, lam, args):
    """One optimisation step; returns the logged loss terms and the logits. Needs a model built with
    both anchors (`build_model(..., support=...)`); one built for evaluation has none."""
    if model.high_anchor is None or model.low_anchor is None:
        raise ValueError("this BiomedAP model was built without anchors (for evaluation or prediction) "
                         "and cannot train: build it with support batches")
    with common.autocast(args.precision, images.device):
        context = model.prompt_learner.class_context()[labels]                    # (B, M, Dt)
        out = model(images, context=context)
        logits = out["logits"].float()
        ce = F.cross_entropy(logits, labels)
        high = lam["high"] * anchor_l1(out["text_features"], model.high_anchor)
        low = lam["low"] * anchor_l1(out["text_features"], model.low_anchor)
        kl = lam["kl"] * anchor_kl(logits, out["anchor_logits"].float(), detach_teacher=args.variant == "paper")
        align = lam["align"] * alignment_loss(out["fused_text"], context)
        w = confidence_weight(logits, args.alpha) if args.variant == "paper" else torch.ones(())
        loss = ce + w * (high + low + kl) + align
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    terms = {"loss": loss, "ce": ce, "high": high, "low": low, "kl": kl, "align": align, "w": w}
    return {k: float(v.detach()) for k, v in terms.items()}, logits.detach()


# =========================================================================== plumbing
def resolve(args, dataset, backbone, ctx_init):
    """The per-dataset official values for every knob left at none."""
    key = dataset.lower()
    n_ctx, few, b2n = OFFICIAL.get(key, (None, GLOBAL_LAMBDAS, GLOBAL_LAMBDAS))
    table = few if args.subsample == "all" else b2n
    if n_ctx is None:
        n_ctx = int((backbone.tokenize([ctx_init])[0] != backbone.pad_id).sum()) - 2
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return {"n_ctx": pick(args.n_ctx, n_ctx), "epochs": pick(args.epochs, EPOCHS[args.subsample]),
            "n_prompts": pick(args.n_prompts, N_PROMPTS[args.subsample]),
            "lambda": {"high": pick(args.lambda_high, table[0]), "kl": pick(args.lambda_kl, table[1]),
                       "low": pick(args.lambda_low, table[2]), "align": pick(args.lambda_align, LAMBDA_ALIGN)}}


def build_model(backbone, classnames, text, cfg, args, device, support=None):
    """The model for `classnames`; for training (`support` batches given) also its two anchors."""
    high = low = None
    if support is not None:
        high = high_anchor(backbone, text, classnames, cfg["n_prompts"])
        low = low_anchor(backbone, args.variant, classnames, support)
    model = BiomedAP(backbone, classnames, text["template"], text["ctx_init"], cfg["n_ctx"], args.variant,
                     args.prompt_tokens, args.fusion_layers, args.fusion_heads, args.fusion_dropout,
                     args.infer_context, high, low)
    return model.to(device)


def lr_factor(epoch, args, epochs):
    """Learning rate / lr at 0-based `epoch`: one constant warm-up epoch at warmup_lr, then cosine
    over the epochs, stepped once per epoch (Dassl's schedule)."""
    return args.warmup_lr / args.lr if epoch == 0 else (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


def setup(args, device, anchors=True):
    """(backbone, model, train, evals, text, cfg), as in both method files: the frozen backbone; the
    model (with both anchors if `anchors`: training needs them); the training classes' few-shot
    splits; the evaluation blocks {"test"} or {"base", "novel"}; the class text; the resolved
    configuration (official per-dataset values for the knobs left at none)."""
    backbone = common.load_backbone(args.backbone, device)
    splits = data.load_splits(args.dataset, args.root, args.download, image_size=backbone.image_size, show=True)
    splits = data.few_shot_splits(splits, args.shots, args.seed)
    train = data.subsample_classes(splits, args.subsample)
    evals = {"test": train} if args.subsample == "all" else {"base": train,
                                                             "novel": data.subsample_classes(splits, "novel")}
    text = data.load_class_text(args.dataset, splits.classnames, args.root, method="biomedap")
    data.check_text_fits(backbone, text, splits.classnames, data.CLASS_TEXT_ENCODES["biomedap"])
    cfg = resolve(args, args.dataset, backbone, text["ctx_init"])
    support = make_eval_loader(train.train, backbone, dataclasses.replace(args, workers=0)) if anchors else None
    model = build_model(backbone, train.classnames, text, cfg, args, device, support)
    return backbone, model, train, evals, text, cfg


def make_train_loader(train, backbone, args):
    """CoOp's augmentation (random-resized crop, no flip), drawn from (seed, epoch, image index);
    the last partial batch is dropped when a full one exists (Dassl)."""
    transform = data.build_transform(backbone.image_size, backbone.mean, backbone.std, train=True)
    return data.make_loader(data.ImageDataset(train.train, transform), args.batch_size, True, args.seed, args.workers)


def make_eval_loader(items, backbone, args):
    transform = data.build_transform(backbone.image_size, backbone.mean, backbone.std, train=False)
    return data.make_loader(data.ImageDataset(items, transform), args.test_batch_size, False, args.seed, args.workers)


def make_optimizer(model, args, epochs):
    """SGD on the learnable tensors; the schedule of `lr_factor`, stepped once per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, args, epochs))
    return optimizer, scheduler


def train_one_epoch(model, loader, optimizer, scheduler, args, device, lam):
    """One pass over the training images (the scheduler steps once, at the end): the mean of each
    loss term, the training accuracy and the epoch's learning rate."""
    model.train()
    sums, correct, seen, lr = {}, 0, 0, optimizer.param_groups[0]["lr"]
    for images, labels in tqdm(loader, desc="train", leave=False, disable=None):
        images, labels = images.to(device), labels.to(device)
        terms, logits = train_step(model, images, labels, optimizer, lam, args)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    scheduler.step()
    return {**{k: v / seen for k, v in sums.items()}, "train_accuracy": 100 * correct / seen, "lr": lr}


@torch.no_grad()
def image_features(model, loader, args, device):
    """Inference image features (n, E) or (n, C, E) per class, and labels (n,)."""
    model.eval()
    text = model.text_features()
    feats, labels = [], []
    for images, y in tqdm(loader, desc="evaluate", leave=False, disable=None):
        with common.autocast(args.precision, device):
            feats.append(model(images.to(device), text_features=text)["image_features"].float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def score(model, feats, text):
    """Logits (n, C) from image features (n, E), or (n, C, E) with per-class inference."""
    sims = torch.einsum("nce,ce->nc", feats, text) if feats.dim() == 3 else feats @ text.t()
    return model.backbone.logit_scale * sims


@torch.no_grad()
def evaluate(model, loader, args, device):
    """Classification metrics of one evaluation split."""
    feats, labels = image_features(model, loader, args, device)
    return common.classification_metrics(score(model, feats, model.text_features()), labels,
                                         len(model.prompt_learner.ids))


@torch.no_grad()
def evaluate_with_robustness(model, loader, args, device, text, classnames):
    """Test metrics and the accuracy under each prompt perturbation; the image features do not
    depend on the fixed part of the prompt, so they are computed once and re-scored."""
    feats, labels = image_features(model, loader, args, device)
    C = len(classnames)
    metrics = common.classification_metrics(score(model, feats, model.text_features()), labels, C)
    accuracy = {}
    for name, sentences in data.perturbed_sentences(text, classnames).items():
        ids, embeds = model.prompt_learner.fixed_part(sentences)
        accuracy[name] = common.classification_metrics(score(model, feats, model.text_features(embeds, ids)),
                                                       labels, C)["accuracy"]
    drops = [accuracy["clinical"] - a for n, a in accuracy.items() if n != "clinical"]
    return metrics, {"accuracy": accuracy, "mean_drop": sum(drops) / len(drops)}


def evaluate_all(model, backbone, train, evals, text, cfg, args, device):
    """Few-shot: {"test"} (and "robustness"). Base-to-novel: {"base", "novel", "harmonic_mean"}:
    the same learned tensors with prompts rebuilt for the novel class names."""
    loader = make_eval_loader(train.test, backbone, args)
    if args.robustness:
        first, robustness = evaluate_with_robustness(model, loader, args, device, text, train.classnames)
    else:
        first, robustness = evaluate(model, loader, args, device), None
    metrics = {"test" if args.subsample == "all" else "base": first}
    if args.subsample == "base":
        novel = evals["novel"]
        novel_model = build_model(backbone, novel.classnames, text, cfg, args, device)
        novel_model.load_state_dict(model.state_dict(), strict=True)
        metrics["novel"] = evaluate(novel_model, make_eval_loader(novel.test, backbone, args), args, device)
        metrics["harmonic_mean"] = common.harmonic_mean(metrics["base"]["accuracy"], metrics["novel"]["accuracy"])
    if robustness is not None:
        metrics["robustness"] = robustness
    return metrics


def classnames_of(evals):
    """Class names per evaluation block, for the axes of confusion.png."""
    return {name: split.classnames for name, split in evals.items()}


def folder_of(args):
    """runs/[<backbone>/]biomedap[-official]/<dataset>/<K>shot[_base2novel]/seed<S>/"""
    method = "biomedap" if args.variant == "paper" else "biomedap-official"
    return runner.run_dir(args.out, method, args.dataset, args.shots, args.seed, args.subsample, args.backbone)


def eval_only(cli):
    """Evaluate a finished run with its saved arguments (evaluation options given on this command
    line win, e.g. --robustness) and rewrite its metrics.json."""
    ckpt, args, given = runner.eval_only_args(cli, Args)
    device = common.resolve_device(args.device)
    backbone, model, train, evals, text, cfg = setup(args, device, anchors=False)
    if ckpt["epoch"] < cfg["epochs"]:
        raise UserError(f"{cli.eval_only} is unfinished (epoch {ckpt['epoch']} of {cfg['epochs']}): "
                        f"finish it with --resume")
    runner.load_trainable(model, ckpt["trainable"])
    start = time.perf_counter()
    metrics = evaluate_all(model, backbone, train, evals, text, cfg, args, device)
    runner.write_eval_only(cli.eval_only, args, metrics, time.perf_counter() - start, given,
                           {"config": cfg, **data.data_record(train)}, classnames_of(evals))
    print(runner.summary_line(metrics), f"-> {cli.eval_only}/metrics.json")
    return metrics


def load_run(run_dir, device="cpu", backbone=None):
    """A finished run as a `runner.Predictor` (`load_run(RUN_DIR)(images)`: class probabilities)."""
    ckpt, args = runner.load_finished_run(run_dir, Args)
    classnames, text = ckpt["classnames"], ckpt["class_text"]  # the run's own: its dataset may have moved
    backbone = backbone or common.load_backbone(args.backbone, device)
    cfg = resolve(args, args.dataset, backbone, text["ctx_init"])
    if ckpt["epoch"] < cfg["epochs"]:
        raise UserError(f"{run_dir} is unfinished (epoch {ckpt['epoch']} of {cfg['epochs']}): finish it with --resume")
    model = build_model(backbone, classnames, text, cfg, args, device)
    runner.load_trainable(model, ckpt["trainable"])
    transform = data.build_transform(backbone.image_size, backbone.mean, backbone.std, train=False)
    return runner.Predictor(model, transform, classnames, device)


def benchmark(args):
    """A training step (--batch-size, 4 classes) against the bare towers' forward and backward; evaluation
    against the bare image tower's forward (16 images on the CPU, else --test-batch-size); --precision."""
    device = common.resolve_device(args.device)
    common.autocast(args.precision, device)  # refuses bf16 without CUDA before anything is loaded
    backbone = common.load_backbone(args.backbone, device)
    text = data.synthetic_class_text()
    classnames, cfg = list(text["classes"]), resolve(args, "synthetic", backbone, text["ctx_init"])
    common.seed_everything(args.seed)
    S, B = backbone.image_size, args.batch_size
    images = torch.randn(B, 3, S, S, device=device)
    labels = torch.arange(B, device=device) % len(classnames)
    model = build_model(backbone, classnames, text, cfg, dataclasses.replace(args, infer_context="mean"), device,
                        support=[(images, labels)])  # the paper's prototypes: from the random batch
    optimizer, _ = make_optimizer(model, args, cfg["epochs"])
    ids = model.prompt_learner.ids
    token = torch.zeros(1, 1, backbone.image_width, device=device, requires_grad=True)  # dummy learnable
    embeds = backbone.token_embedding(ids).detach().requires_grad_()

    def step():
        model.train()
        train_step(model, images, labels, optimizer, cfg["lambda"], args)

    def floor():
        with common.autocast(args.precision, device):
            h = backbone.image_tokens(images) + token
            for i in range(backbone.num_blocks):
                h = backbone.image_block(h, i)
            loss = backbone.image_head(h).float().sum() + backbone.text_from_embeddings(embeds, ids).float().sum()
        loss.backward()

    n_eval = 16 if device.type == "cpu" else args.test_batch_size
    eval_images = torch.randn(n_eval, 3, S, S, device=device)
    with torch.no_grad():
        text_feats = model.eval().text_features()  # once per evaluation, as in `image_features`

    def infer():
        model.eval()
        model(eval_images, text_features=text_feats)

    extra = {"method": "biomedap", "variant": args.variant, "backbone": args.backbone, "batch": B,
             "eval_batch": n_eval, "classes": len(classnames), "prompt_length": ids.shape[1]}
    return runner.benchmark_report(device, args.precision, step, floor, infer,
                                   lambda: backbone.encode_image(eval_images), n_eval,
                                   sum(p.numel() for p in model.parameters() if p.requires_grad), extra)


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
    loader = make_train_loader(train, backbone, args)
    optimizer, scheduler = make_optimizer(model, args, cfg["epochs"])
    print(runner.describe_trainable(model, group=("fusion",)), f"{len(train.train)} training images,",
          f"{len(train.classnames)} classes, {len(loader)} steps/epoch; config {cfg}")
    first = runner.restore_training_state(ckpt, model, optimizer, scheduler) if ckpt else 1
    class_text = dict(text, classes={c: text["classes"][c] for c in train.classnames})  # kept for --predict
    setup_s, train_start = time.perf_counter() - start, time.perf_counter()
    last = min(args.stop_after_epoch or cfg["epochs"], cfg["epochs"])
    with run.stop_on_ctrl_c():
        for epoch in range(first, last + 1):
            epoch_start = time.perf_counter()
            loader.sampler.set_epoch(epoch)  # the order and augmentations of this epoch
            stats = train_one_epoch(model, loader, optimizer, scheduler, args, device, cfg["lambda"])
            runner.check_finite(stats, epoch)
            run.save_checkpoint(runner.training_state(model, args, epoch, optimizer, scheduler, class_text))
            print(runner.epoch_line(epoch, cfg["epochs"], stats, time.perf_counter() - epoch_start), flush=True)
        if last < cfg["epochs"]:
            print(f"stopped after epoch {last} (--stop-after-epoch); continue with --resume")
            return None
        run.phase = "evaluation"
        train_s, eval_start = time.perf_counter() - train_start, time.perf_counter()
        metrics = evaluate_all(model, backbone, train, evals, text, cfg, args, device)
        timings = {"setup_s": setup_s, "train_s": train_s, "eval_s": time.perf_counter() - eval_start}
        run.phase = "results"
        with runner.ctrl_c_held():  # metrics.json, the picture and the finished checkpoint, all or none
            runner.write_metrics(run.path, args, metrics, timings, {
                "config": cfg, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                **data.data_record(train)}, classnames_of(evals))
            runner.finish_checkpoint(run.path)
            print(runner.summary_line(metrics), f"-> {run.path / 'metrics.json'}", flush=True)
    return metrics


if __name__ == "__main__":
    runner.run_cli(main, Args, "BiomedAP: gated cross-modal fusion and dual anchors for prompt learning "
                               "on a frozen BiomedCLIP (see the module docstring).")
