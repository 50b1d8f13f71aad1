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

Equation map. Only the paper's abstract and its method figure (Figure 2 of the paper, in the
repository README; Figure 1 is the comparison with earlier methods) could be read; each line names
the figure's block (or the abstract), then the code:
    learnable context "a [MODALITY] photo of a" + class name (Fig. 2, text)  -> `PromptLearner`
    visual prompts: zeros (released) / deep VPT (Fig. 2, image)  -> `official_prompts`, `paper_prompts`
    Gated Cross-Modal Prompt Fusion, "Unified Interaction Space" (Fig. 2)  -> `GatedFusion.forward`
    text context: GT class in training, mean of classes at inference (Fig. 2)  -> `BiomedAP.forward`
    High Anchors: centroid of expert prompts (abstract, Fig. 2)  -> `high_anchor`
    Low Anchors: few-shot visual prototypes (abstract; text released)  -> `prototype_anchor`, `text_anchor`
    logits s f t^T and anchor logits s f h^T (released code)  -> `BiomedAP.forward`
    L_ce, L1 to each anchor, KL to the anchor logits, alignment  -> `anchor_l1`, `anchor_kl`, `alignment_loss`
    Confidence-Aware Adaptive Loss, w = 1 + alpha H(p)/log C (abstract, Fig. 2)  -> `confidence_weight`
    L = L_ce + w (L_high + L_low + L_kl + L_align) (Fig. 2)  -> `biomedap_loss` (one step: `train_step`)
    CoOp's transforms, SGD with one warm-up epoch then cosine (released)  -> `transforms`, `make_optimizer`

In your own code (README, "Use a method in your own code"): `BiomedAP(...)`, then `train_step` (or
`biomedap_loss`) per batch and `scheduler.step()` per epoch. Training passes each image's own
class context (`model.prompt_learner.class_context()[labels]`); inference passes none.
`fusion_layers=[]` builds it without fusion (the ablation `--fusion-layers none`).

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
     unused); low anchor = few-shot visual prototypes; KL teacher detached (it is a target); the
     confidence weight w scales L_high, L_low, L_kl and L_align (Figure 2 routes all four into the
     confidence-aware loss; the released code has no w). `--low-anchor` (released LOW_TEMPLATE_TYPE)
     and `--fusion-layers none` (ENABLE_FUSION False; no fusion, no L_align) work in both variants.
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
 14. Images are decoded as a viewer shows them (`data.to_rgb`); official: PIL's convert("RGB"), the
     same pixels for 8-bit RGB or grey files without an EXIF orientation.
"""
import dataclasses
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm import tqdm

import common
from common import UserError, arg, list_arg

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
DEFAULT_LOW_ANCHOR = {"paper": "prototypes", "official": "minimal"}  # few-shot visual prototypes / "{class}"


def official_settings(dataset: str, subsample: str = "all") -> dict:
    """The released code's values for a benchmark (`btmri`, ...; few-shot "all" or base-to-novel
    "base"): n_ctx (None where there is no per-dataset value: all ctx_init tokens), the loss weights,
    epochs, descriptions per class in the high anchor. Other datasets: the released global defaults."""
    n_ctx, few, b2n = OFFICIAL.get(dataset.lower(), (None, GLOBAL_LAMBDAS, GLOBAL_LAMBDAS))
    high, kl, low = few if subsample == "all" else b2n
    return {"n_ctx": n_ctx, "lambda_high": high, "lambda_kl": kl, "lambda_low": low, "lambda_align": LAMBDA_ALIGN,
            "epochs": EPOCHS[subsample], "n_prompts": N_PROMPTS[subsample]}


def context_tokens(backbone, ctx_init: str) -> int:
    """The number of tokens of ctx_init (without start and end): the default M."""
    return int((backbone.tokenize([ctx_init])[0] != backbone.pad_id).sum()) - 2


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
class GatedFusion(nn.Module):
    """Gated bidirectional cross-attention between visual prompts P_v (B, P, D) and the text context
    P_t (B, M, Dt) (Fig. 2's GCPF; released trainers/cross_modal_fusion.py). Only the attentions run
    at Du = max(D, Dt), the narrower stream projected in (Pi) and back (Po); the rest works at each
    stream's own width, as official:
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
        heads = max(h for h in range(1, heads + 1) if width % h == 0)  # deviation 8
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
    image features (None without anchors: a model for evaluation or prediction cannot train).
    fusion_layers: None for the paper's blocks (`default_fusion_layers`), [] for no fusion."""

    def __init__(self, backbone, classnames, template, ctx_init, n_ctx, variant="paper",
                 prompt_tokens=4, fusion_layers=None, heads=8, dropout=0.1, infer_context="mean",
                 high_anchor=None, low_anchor=None):
        super().__init__()
        self.backbone, self.variant, self.infer_context = backbone, variant, infer_context
        depth, width = backbone.num_blocks, backbone.image_width
        self.fusion_layers = layers = default_fusion_layers(depth) if fusion_layers is None else list(fusion_layers)
        self.settings = dict(template=template, ctx_init=ctx_init, n_ctx=n_ctx, variant=variant,  # for_classes
                             prompt_tokens=prompt_tokens, fusion_layers=layers, heads=heads,
                             dropout=dropout, infer_context=infer_context)
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
def high_anchor(backbone, descriptions):
    """High anchor h_c = norm(mean_m norm(E_T(description_{c,m}))): descriptions is one list of
    expert sentences per class, in class order -> (C, E)."""
    return common.class_centroids(backbone, descriptions)


@torch.no_grad()
def prototype_anchor(backbone, support, num_classes: int):
    """Low anchor of the paper: the few-shot visual prototype l_c = norm(mean_k norm(E_I(x_{c,k})))
    of the frozen, unprompted image tower, from `support` batches (images (B, 3, S, S) under the
    test transform, labels (B,)) holding the K support images -> (C, E)."""
    feats = torch.zeros(num_classes, backbone.embed_dim, device=backbone.device)
    for images, labels in support:
        f = F.normalize(backbone.encode_image(images.to(backbone.device)).float(), dim=-1)  # (B, E)
        feats.index_add_(0, labels.to(feats.device), f)
    return F.normalize(feats, dim=-1)


# The released low anchors (ZERO_SHOT_TEMPLATES[LOW_TEMPLATE_TYPE]; "medical" is medical_minimal).
# The released "empty" template "" is replaced by the text "X": one anchor shared by every class.
LOW_TEMPLATES = {"minimal": "{}", "article": "a {}", "generic": "a photo of {}",
                 "medical": "a medical image of {}", "empty": "X"}


def text_anchor(backbone, classnames, template="{}"):
    """Low anchor of the released code: l_c = norm(E_T(template.format(class))), by default the
    class name alone ("minimal"; the other forms: LOW_TEMPLATES) -> (C, E)."""
    return common.encode_sentences(backbone, [template.format(c) for c in classnames])


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


def biomedap_loss(out, labels, high_anchor, low_anchor, variant="paper", lambda_high=12.5, lambda_kl=0.25,
                  lambda_low=0.3, lambda_align=0.1, alpha=1.0):
    """L = L_ce + w (L_high + L_low + L_kl + L_align) from the model's training forward `out`
    (logits (B, C), text_features (C, E), anchor_logits (B, C), fused_text, context). The
    weights default to the released global defaults (`official_settings` has the per-dataset
    table); w = 1 in the official variant. Returns every term, weighted, and the total "loss";
    a model without fusion has no "align" term (nothing to align)."""
    logits = out["logits"].float()
    ce = F.cross_entropy(logits, labels)
    high = lambda_high * anchor_l1(out["text_features"], high_anchor)
    low = lambda_low * anchor_l1(out["text_features"], low_anchor)
    kl = lambda_kl * anchor_kl(logits, out["anchor_logits"].float(), detach_teacher=variant == "paper")
    align = lambda_align * alignment_loss(out["fused_text"], out["context"])  # 0 without fusion
    if variant == "paper":
        w = confidence_weight(logits, alpha)
        loss = ce + w * (high + low + kl + align)
    else:
        w, loss = torch.ones(()), ce + (high + low + kl) + align
    terms = {"loss": loss, "ce": ce, "high": high, "low": low, "kl": kl, "align": align, "w": w}
    return terms if out["fused_text"] else {k: v for k, v in terms.items() if k != "align"}


# --------------------------------------------------------------------------- training recipe
def transforms(backbone):
    """CoOp's (train, test) transforms for RGB PIL images, at the backbone's input size S:
    random-resized crop (8-100% of the area, bicubic, no flip) / resize and centre crop; then
    ToTensor and the backbone's normalisation -> (3, S, S)."""
    S, bicubic = backbone.image_size, T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)]
    return (T.Compose([T.RandomResizedCrop(S, scale=(0.08, 1.0), interpolation=bicubic), *tail]),
            T.Compose([T.Resize(S, interpolation=bicubic), T.CenterCrop(S), *tail]))


def lr_factor(epoch: int, epochs: int, lr: float, warmup_lr: float) -> float:
    """Learning rate / lr at 0-based `epoch`: one constant warm-up epoch at warmup_lr, then cosine
    over the epochs, stepped once per epoch (Dassl's schedule)."""
    return warmup_lr / lr if epoch == 0 else (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


def make_optimizer(model, epochs: int, lr=0.0025, momentum=0.9, weight_decay=5e-4, warmup_lr=1e-5):
    """SGD on the learnable tensors with the schedule of `lr_factor` (call scheduler.step() once an
    epoch); the defaults are the released ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, epochs, lr, warmup_lr))
    return optimizer, scheduler


def train_step(model, images, labels, optimizer, precision="fp32", **loss_weights):
    """One optimisation step on images (B, 3, S, S) and labels (B,): the model sees the context of
    each image's own class (training only; inference takes no labels). Returns the logged loss
    terms and the logits. `loss_weights` go to `biomedap_loss`. Raises ValueError for a model
    built without anchors (one for evaluation or prediction)."""
    if model.high_anchor is None or model.low_anchor is None:
        raise ValueError("this BiomedAP model was built without anchors (for evaluation or prediction) "
                         "and cannot train: give it high_anchor and low_anchor")
    with common.autocast(precision, images.device):
        context = model.prompt_learner.class_context()[labels]                    # (B, M, Dt)
        out = model(images, context=context)
        terms = biomedap_loss(out, labels, model.high_anchor, model.low_anchor, model.variant, **loss_weights)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}, out["logits"].detach()


def train_one_epoch(model, batches, optimizer, scheduler, device, precision="fp32", **loss_weights):
    """One pass over `batches` of (images, labels), then one scheduler step: the mean of each loss
    term, the training accuracy (%) and the epoch's learning rate."""
    model.train()
    sums, correct, seen, lr = {}, 0, 0, optimizer.param_groups[0]["lr"]
    for images, labels in tqdm(batches, desc="train", leave=False, disable=None):
        images, labels = images.to(device), labels.to(device)
        terms, logits = train_step(model, images, labels, optimizer, precision, **loss_weights)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    scheduler.step()
    return {**{k: v / seen for k, v in sums.items()}, "train_accuracy": 100 * correct / seen, "lr": lr}


@torch.no_grad()
def image_features(model, batches, device, precision="fp32"):
    """Inference image features (n, E), or (n, C, E) with per-class inference, and labels (n,)."""
    model.eval()
    text = model.text_features()
    feats, labels = [], []
    for images, y in tqdm(batches, desc="evaluate", leave=False, disable=None):
        with common.autocast(precision, device):
            feats.append(model(images.to(device), text_features=text)["image_features"].float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def score(model, feats, text):
    """Logits (n, C) from image features (n, E), or (n, C, E) with per-class inference."""
    sims = torch.einsum("nce,ce->nc", feats, text) if feats.dim() == 3 else feats @ text.t()
    return model.backbone.logit_scale * sims


@torch.no_grad()
def evaluate(model, batches, device, precision="fp32", perturbed=None):
    """Classification metrics (common.classification_metrics) on `batches` of (images, labels).
    With `perturbed` ({name: one sentence per class}, e.g. the "clinical" prompt and its
    perturbations), also {"accuracy": {name: %}, "mean_drop": mean drop from "clinical"}: the
    image features do not depend on the fixed part of the prompt, so they are computed once."""
    feats, labels = image_features(model, batches, device, precision)
    C = len(model.prompt_learner.ids)
    metrics = common.classification_metrics(score(model, feats, model.text_features()), labels, C)
    if perturbed is None:
        return metrics
    accuracy = {}
    for name, sentences in perturbed.items():
        ids, embeds = model.prompt_learner.fixed_part(sentences)
        accuracy[name] = common.classification_metrics(score(model, feats, model.text_features(embeds, ids)),
                                                       labels, C)["accuracy"]
    drops = [accuracy["clinical"] - a for n, a in accuracy.items() if n != "clinical"]
    return metrics, {"accuracy": accuracy, "mean_drop": sum(drops) / len(drops)}


def for_classes(model, classnames):
    """The same learned tensors with prompts for other class names (base-to-novel's novel
    classes), without anchors: a model for evaluation."""
    other = BiomedAP(model.backbone, classnames, **model.settings)
    other.load_state_dict(model.state_dict(), strict=True)
    return other.to(model.prompt_learner.ctx.device)


# =========================================================================== command line
def block(text):
    """A --fusion-layers value: a block index, or none (no fusion)."""
    return "none" if text.lower() == "none" else int(text)


@dataclasses.dataclass
class Args:  # the method's knobs; runner.py adds the experiment (--dataset, --shots, --seed,
    # --subsample, --backbone) and the run flags (--eval-only, --resume, --device, --out, ...)
    # the method (official configs/trainers/BiomedAP defaults)
    variant: str = arg("paper", "paper: the method as published; official: the released code's behaviour",
                       ["paper", "official"])
    n_ctx: int = arg(None, "M context tokens; none: official per-dataset value, else all ctx_init tokens", at_least=1)
    n_prompts: int = arg(None, "expert descriptions per class in the high anchor; none: 40, b2n 50", at_least=1)
    prompt_tokens: int = arg(4, "P visual prompt tokens (official 4)", at_least=1)
    fusion_layers: list = list_arg(block, "blocks that get the gated fusion (0-based), or none: no fusion and no "
                                          "L_align; not given: 5 and 8 of 12, scaled to the depth", metavar="BLOCK")
    fusion_heads: int = arg(8, "heads of the fusion cross-attention (official 8)", at_least=1)
    fusion_dropout: float = arg(0.1, "dropout in the fusion attention and feed-forward (official 0.1)",
                                at_least=0, below=1)
    lambda_high: float = arg(None, "weight of L1 to the high anchor; none: official per-dataset table", at_least=0)
    lambda_kl: float = arg(None, "weight of KL to the anchor logits; none: official per-dataset table", at_least=0)
    lambda_low: float = arg(None, "weight of L1 to the low anchor; none: official per-dataset table", at_least=0)
    lambda_align: float = arg(None, "weight of the fusion alignment loss; none: official 0.1", at_least=0)
    alpha: float = arg(1.0, "confidence-aware weight w = 1 + alpha * normalised entropy (paper variant)",
                       at_least=0)
    low_anchor: str = arg(None, "low anchor: few-shot visual prototypes, or the released text forms (minimal "
                          "'{class}', article 'a {class}', generic 'a photo of {class}', medical 'a medical image "
                          "of {class}', empty 'X'); none: prototypes (paper), minimal (official)",
                          ["prototypes", *LOW_TEMPLATES])
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

    def check(self):
        """Flags that contradict each other (the run machinery calls this with the range checks)."""
        if "none" in self.fusion_layers and len(self.fusion_layers) > 1:
            raise UserError("--fusion-layers none means no fusion: give it alone, or block numbers")
        if self.fusion_layers == ["none"] and self.lambda_align:
            raise UserError("--lambda-align weighs the fusion's alignment loss, but --fusion-layers none has no "
                            "fusion: leave one of them out")


# What the run machinery (runner.py: run folders, resume, --eval-only, --predict, --benchmark)
# calls (it has nothing to add after an epoch, to the metrics, the pictures or a prediction); a
# method copied into another project needs none of it.
NAME = "biomedap"  # the class text it reads: descriptions, and ctx_init
TRAINABLE_GROUPS = ("fusion",)  # each fusion module is listed as one entry at the start of a run


def run_name(args) -> str:
    """biomedap[-official] and a suffix per ablation switch off its default (run.sh's method_dir
    says the same), so that an ablation never shares a run folder with the full method."""
    name = "biomedap" if args.variant == "paper" else "biomedap-official"
    if args.fusion_layers:
        name += "-no-fusion" if args.fusion_layers == ["none"] else "-fusion" + "-".join(map(str, args.fusion_layers))
    if args.low_anchor not in (None, DEFAULT_LOW_ANCHOR[args.variant]):
        name += f"-low-{args.low_anchor}"
    for term in ("high", "low", "kl", "align"):
        name += f"-no-{term}" if getattr(args, f"lambda_{term}") == 0 else ""
    return name + ("-no-confidence" if args.alpha == 0 else "")


def configure(args, backbone, class_text) -> dict:
    """The released per-dataset values for every knob left at none; fusion blocks, low anchor."""
    official = official_settings(args.dataset, args.subsample)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    n_ctx = official["n_ctx"] or context_tokens(backbone, class_text["ctx_init"])
    fusion = [] if args.fusion_layers == ["none"] else args.fusion_layers or default_fusion_layers(backbone.num_blocks)
    return {"n_ctx": pick(args.n_ctx, n_ctx), "epochs": pick(args.epochs, official["epochs"]),
            "n_prompts": pick(args.n_prompts, official["n_prompts"]), "fusion_layers": fusion,
            "low_anchor": args.low_anchor or DEFAULT_LOW_ANCHOR[args.variant],
            "lambda": {"high": pick(args.lambda_high, official["lambda_high"]),
                       "kl": pick(args.lambda_kl, official["lambda_kl"]),
                       "low": pick(args.lambda_low, official["lambda_low"]),
                       "align": pick(args.lambda_align, official["lambda_align"]) if fusion else 0.0}}


def input_size(args, backbone) -> int:
    return backbone.image_size


def transforms_for(args, backbone):
    return transforms(backbone)


def loader_settings(cfg, args) -> dict:
    return {"batch_size": args.batch_size, "test_batch_size": args.test_batch_size, "drop_last": True}


def build(backbone, classnames, class_text, cfg, args, support=None):
    """The model for `classnames`; with `support` batches (training) also its two anchors."""
    high = low = None
    if support is not None:
        classes = class_text["classes"]
        high = high_anchor(backbone, [classes[c]["descriptions"][:cfg["n_prompts"]] for c in classnames])
        low = (prototype_anchor(backbone, support, len(classnames)) if cfg["low_anchor"] == "prototypes"
               else text_anchor(backbone, classnames, LOW_TEMPLATES[cfg["low_anchor"]]))
    return BiomedAP(backbone, classnames, class_text["template"], class_text["ctx_init"], cfg["n_ctx"],
                    args.variant, args.prompt_tokens, cfg["fusion_layers"], args.fusion_heads, args.fusion_dropout,
                    args.infer_context, high, low)


def loss_weights(cfg, args) -> dict:
    return {**{f"lambda_{term}": weight for term, weight in cfg["lambda"].items()}, "alpha": args.alpha}


def make_optimizer_for(model, cfg, args, steps_per_epoch):
    return make_optimizer(model, cfg["epochs"], args.lr, args.momentum, args.weight_decay, args.warmup_lr)


def train_epoch(model, loader, optimizer, scheduler, cfg, args, device):
    return train_one_epoch(model, loader, optimizer, scheduler, device, args.precision, **loss_weights(cfg, args))


def evaluate_run(model, backbone, evals, loaders, class_text, cfg, args, device, perturbed=None):
    """Few-shot: {"test"} (and "robustness"). Base-to-novel: {"base", "novel", "harmonic_mean"}:
    the same learned tensors with prompts rebuilt for the novel class names."""
    first = "test" if args.subsample == "all" else "base"
    result = evaluate(model, loaders[first], device, args.precision, perturbed)
    metrics = {first: result[0]} if perturbed is not None else {first: result}
    if args.subsample == "base":
        novel = for_classes(model, evals["novel"].classnames)
        metrics["novel"] = evaluate(novel, loaders["novel"], device, args.precision)
        metrics["harmonic_mean"] = common.harmonic_mean(metrics["base"]["accuracy"], metrics["novel"]["accuracy"])
    if perturbed is not None:
        metrics["robustness"] = result[1]
    return metrics


def benchmark_parts(args, backbone, device, class_text) -> dict:
    """A training step (--batch-size, the synthetic set's 4 classes) against the bare towers' forward
    and backward; evaluation against the bare image tower's forward (16 images on the CPU, else
    --test-batch-size). The paper's prototypes come from the random batch."""
    classnames, cfg = list(class_text["classes"]), configure(dataclasses.replace(args, dataset="synthetic"),
                                                             backbone, class_text)
    S, B = backbone.image_size, args.batch_size
    images = torch.randn(B, 3, S, S, device=device)
    labels = torch.arange(B, device=device) % len(classnames)
    model = build(backbone, classnames, class_text, cfg, dataclasses.replace(args, infer_context="mean"),
                  support=[(images, labels)]).to(device)
    optimizer, _ = make_optimizer_for(model, cfg, args, 1)
    ids = model.prompt_learner.ids
    token = torch.zeros(1, 1, backbone.image_width, device=device, requires_grad=True)  # dummy learnable
    embeds = backbone.token_embedding(ids).detach().requires_grad_()

    def step():
        model.train()
        train_step(model, images, labels, optimizer, args.precision, **loss_weights(cfg, args))

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
    return {"step": step, "floor": floor, "infer": infer, "infer_floor": lambda: backbone.encode_image(eval_images),
            "eval_images": n_eval, "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                               if p.requires_grad), "extra": extra}


def main(argv=None):
    import runner  # the run machinery lives outside the method, so that this file and common.py stand alone
    return runner.run_method(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
