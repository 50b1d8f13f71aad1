"""The frozen backbone and what both methods compute with it: loading, the seams a prompt
method needs inside the towers, text features, zero-shot logits, classification metrics,
seeding, device and autocast, `UserError`, and the two small helpers a method's `Args`
dataclass is written with (`arg`, `list_arg`). It imports no project file.

Backbones (`load_backbone`): biomedclip (hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_
patch16_224), clip (OpenAI CLIP ViT-B/16), hf-hub:ORG/REPO (any open_clip hub model),
local-dir:PATH (open_clip_config.json + open_clip_pytorch_model.bin, and for a Hugging Face text
tower its config.json and vocab.txt), MODEL:PRETRAINED (an open_clip name and tag), and built
offline with random weights: tiny, tiny-clip (tests, smoke runs), biomedclip-random (benchmarks).
Two tower families, `Backbone.kind`: "timm-hf" (timm ViT + Hugging Face BERT: BiomedCLIP) and
"openclip" (open_clip's ViT and causal text transformer: OpenAI CLIP).

Symbols: B batch, C classes, L tokens, N patches, D tower width, E joint embedding width.
"""
import argparse
import dataclasses
import json
import logging
import os
import random
import re
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input; the CLIs print its message (one line, at most two) and exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers a bad command line with one line (not the whole usage) and exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def one_line(error: BaseException) -> str:
    """An exception's whole message on one line (a library's multi-line text, joined)."""
    return " ".join(str(error).split()) or type(error).__name__


def arg(default, help: str, choices=None, *, at_least=None, above=None, below=None, at_most=None,
        resume_may_differ: bool = False, eval_option: bool = False, metavar=None, hidden: bool = False):
    """A field of an `Args` dataclass: its default and --help line, `choices`, the allowed range
    (`at_least`/`at_most` inclusive, `above`/`below` exclusive), whether it may change on --resume
    (`resume_may_differ`: it changes no number) and whether --eval-only takes it from the command
    line (`eval_option`). Plain dataclass metadata: only the command line (runner.py) reads it."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "at_least": at_least, "above": above, "below": below,
        "at_most": at_most, "resume_may_differ": resume_may_differ, "eval_option": eval_option,
        "metavar": metavar, "hidden": hidden})


def list_arg(kind, help: str, nargs: str = "*", metavar=None, **semantics):
    """A list field of an `Args` dataclass (empty by default): `--flag A B C`; nargs "+" when the
    flag, once given, needs at least one value. `semantics` as in `arg`."""
    field = arg(None, help, metavar=metavar, **semantics)
    return dataclasses.field(default_factory=list, metadata={**field.metadata, "type": kind, "nargs": nargs})


# --------------------------------------------------------------------------- backbones
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
ALIASES = {"biomedclip": BIOMEDCLIP, "clip": "ViT-B-16:openai"}
RANDOM_BACKBONES = ("tiny", "tiny-clip", "biomedclip-random")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Backbone:
    """A frozen open_clip model plus the seams a prompt method needs inside its towers.

    Image tower:  image_tokens(x) -> (B, 1+N, D); image_block(h, i) -> (B, L, D) for
                  i < num_blocks; image_head(h) -> (B, E) (final norm, CLS pool, projection).
    Text tower:   tokenize(texts) -> (n, L) ids trimmed to the longest real length;
                  token_embedding(ids) -> (n, L, Dt); text_from_embeddings(emb, ids) -> (n, E).
    Without any prompt these give exactly model.encode_image / model.encode_text.

    `load_backbone(name)` loads one by name; `Backbone.from_open_clip(model, tokenizer)` wraps an
    open_clip model you loaded yourself. The model is frozen and put in eval mode.
    """

    @classmethod
    def from_open_clip(cls, model, tokenizer, name: str = "custom", image_size=None, mean=None, std=None):
        """Wrap an open_clip CLIP-like model that you loaded your own way (e.g.
        `open_clip.create_model_and_transforms(...)`), with its tokenizer (`open_clip.get_tokenizer`).
        The input size and normalisation default to the model's own preprocessing config (224 and
        OpenAI's mean/std when it has none). Two tower families are supported: timm ViT + Hugging
        Face text (BiomedCLIP) and open_clip's ViT + text transformer (CLIP); another raises
        UserError naming the towers found. The model is frozen (requires_grad off, eval mode)."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = image_size or cfg.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(model, tokenizer, name, _tower_kind(model), size, mean or cfg.get("mean", OPENAI_MEAN),
                   std or cfg.get("std", OPENAI_STD))

    def __init__(self, model, tokenizer, name, kind, image_size, mean, std):
        self.model, self.tokenizer, self.name, self.kind = model, tokenizer, name, kind
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        model.eval()
        model.requires_grad_(False)
        if kind == "timm-hf":
            trunk, text = model.visual.trunk, model.text.config
            self.num_blocks, self.image_width = len(trunk.blocks), trunk.embed_dim
            self.text_width, self.pad_id = text.hidden_size, text.pad_token_id
        else:
            tower = model.visual.transformer
            self.num_blocks, self.image_width = len(tower.resblocks), tower.width
            self.text_width, self.pad_id = model.transformer.width, 0
        self.embed_dim = self.encode_text(self.tokenize(["a"])).shape[-1]

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    # image tower -------------------------------------------------------------------
    def image_tokens(self, x):
        """Patch + position embedding (and the pre-norm): (B, 3, H, W) -> (B, 1+N, D)."""
        if self.kind == "timm-hf":
            t = self.model.visual.trunk
            return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))
        return self.model.visual._embeds(x)

    def image_block(self, h, i):
        if self.kind == "timm-hf":
            return self.model.visual.trunk.blocks[i](h)
        return self.model.visual.transformer.resblocks[i](h)

    def image_head(self, h):
        """Final norm, CLS pooling and projection: (B, L, D) -> (B, E)."""
        if self.kind == "timm-hf":
            t = self.model.visual.trunk
            return self.model.visual.head(t.forward_head(t.norm(h)))
        v = self.model.visual
        pooled, _ = v._pool(h)
        return pooled @ v.proj if v.proj is not None else pooled

    def encode_image(self, x):
        return self.model.encode_image(x)

    # text tower --------------------------------------------------------------------
    def tokenize(self, texts):
        """Token ids (n, L), trimmed to the longest real prompt: padding is masked (BERT)
        or after the end token under a causal mask (CLIP), so the features are unchanged."""
        ids = self.tokenizer(list(texts))
        real = (ids != self.pad_id).long()
        length = int((real * torch.arange(1, ids.shape[1] + 1)).max())
        return ids[:, :max(length, 1)].to(self.device)

    def token_embedding(self, ids):
        if self.kind == "timm-hf":
            return self.model.text.transformer.get_input_embeddings()(ids)
        return self.model.token_embedding(ids)

    def text_from_embeddings(self, embeds, ids):
        """Text features from word embeddings (n, L, Dt) and their ids (n, L) -> (n, E);
        the tower adds its own position embeddings, attention mask, pooling, projection."""
        if self.kind == "timm-hf":
            text = self.model.text
            mask = (ids != self.pad_id).long()
            out = text.transformer(inputs_embeds=embeds, attention_mask=mask)
            return text.proj(text.pooler(out, mask))
        m = self.model
        L = ids.shape[1]
        x = embeds + m.positional_embedding[:L].to(embeds.dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:L, :L]))
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]  # end token
        return x @ m.text_projection if not isinstance(m.text_projection, torch.nn.Linear) \
            else m.text_projection(x)

    def encode_text(self, ids):
        return self.text_from_embeddings(self.token_embedding(ids), ids)


def load_backbone(name: str = "biomedclip", device="cpu") -> Backbone:
    """Load a frozen backbone by name (see the module docstring for the names)."""
    full = ALIASES.get(name, name)
    if name in RANDOM_BACKBONES:
        model, tokenizer, size, mean, std = _build_random(name)
    elif full.startswith("local-dir:"):
        model, tokenizer, size, mean, std = _load_local_dir(Path(full[len("local-dir:"):]))
    elif ":" in full:  # hf-hub:ORG/REPO or MODEL:PRETRAINED
        model, tokenizer = _load_open_clip(name, full)
        return Backbone.from_open_clip(model.to(device), tokenizer, name)
    else:
        raise UserError(f"unknown backbone '{name}': use biomedclip, clip, {', '.join(RANDOM_BACKBONES)}, "
                        "hf-hub:ORG/REPO, local-dir:PATH or an open_clip MODEL:PRETRAINED name")
    return Backbone.from_open_clip(model.to(device), tokenizer, name, size, mean, std)


def _load_open_clip(name, full):
    """A hub model (hf-hub:ORG/REPO) or an open_clip name and tag (MODEL:PRETRAINED, weights also
    from the hub). With HF_HUB_OFFLINE set (the CLIs set it when the hub cannot be reached:
    `runner.offline_unless_reachable`), cached files load and missing ones fail at once with this
    backbone's recipe. Weights that do not load are an error (open_clip warns, uses random ones)."""
    import open_clip
    from huggingface_hub import constants
    from open_clip.pretrained import download_pretrained_from_hf

    if full.startswith("hf-hub:"):
        repo, weights = full[len("hf-hub:"):], ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    else:
        arch, tag = full.split(":", 1)
        repo, file = os.path.split(open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", ""))
        file = file or "open_clip_pytorch_model.bin"  # open_clip tries a .safetensors copy first
        safe = "open_clip_model.safetensors" if file == "open_clip_pytorch_model.bin" else \
            re.sub(r"\.(bin|pth)$", ".safetensors", file)
        weights = tuple(dict.fromkeys((safe, file)))
    offline, fetched = bool(repo) and constants.HF_HUB_OFFLINE, not full.startswith("hf-hub:")
    logging.disable(logging.ERROR)  # open_clip logs each failure; ours is the one below
    try:
        if not fetched:  # create_model fetches them too, but only warns and goes on when that fails
            fetched = bool(download_pretrained_from_hf(repo))
            model, tokenizer = open_clip.create_model(full, require_pretrained=True), open_clip.get_tokenizer(full)
        else:  # a tag's weights: create_model raises when they fail
            model = open_clip.create_model(arch, pretrained=tag, require_pretrained=True)
            tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:  # missing weights, unknown tag, a file of another repo (a text tower)
        if offline and _not_in_cache(e):
            raise UserError(_offline_recipe(name, full, repo, weights[0])) from None
        raise UserError(f"could not load {'backbone' if fetched else 'the weights of backbone'} '{full}' "
                        f"({one_line(e)}); a downloaded copy loads with --backbone local-dir:FOLDER (README, "
                        "Backbones)") from None
    finally:
        logging.disable(logging.NOTSET)
    return model, tokenizer


def _not_in_cache(error: BaseException) -> bool:
    """Whether a hub file missing from the offline cache caused `error` (open_clip and
    transformers wrap the hub library's error: follow the chain of causes)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = []
    while error is not None and error not in chain:  # each cause once: a chain can loop
        chain.append(error)
        error = error.__cause__ or error.__context__
    return any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in chain)


def _offline_recipe(name, full, repo, weights) -> str:
    """Two lines: what failed, and how to get this backbone's files onto a machine without network."""
    failed = (f"could not load backbone '{name}': the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE "
              f"is set) and its files are not cached; --backbone tiny tries everything offline")
    where = f"on a machine with network: hf download {repo}"
    if full == BIOMEDCLIP:
        fix = f"{where} and its text tower (README, Offline BiomedCLIP), then --backbone local-dir:FOLDER or HF_HUB_OFFLINE=1"
    elif full.startswith("hf-hub:"):
        fix = f"{where} (or with --local-dir FOLDER), then HF_HUB_OFFLINE=1 (or --backbone local-dir:FOLDER)"
    else:
        fix = f"{where} {weights} (into the Hugging Face cache), then HF_HUB_OFFLINE=1"
    return f"{failed}\n{fix}"


def _tower_kind(model) -> str:
    import open_clip

    if isinstance(model.visual, open_clip.timm_model.TimmModel) and \
            isinstance(getattr(model, "text", None), open_clip.hf_model.HFTextEncoder):
        if getattr(model.visual.trunk, "global_pool", "token") != "token":
            raise UserError("this backbone's timm image tower does not pool the class token; "
                            "only class-token ViTs are supported")
        return "timm-hf"
    if isinstance(model.visual, open_clip.transformer.VisionTransformer) and hasattr(model, "token_embedding"):
        return "openclip"
    towers = f"{type(model.visual).__name__} + {type(getattr(model, 'text', model)).__name__}"
    raise UserError(f"unsupported towers ({towers}); supported: timm ViT + Hugging Face text (BiomedCLIP), "
                    "open_clip ViT + text transformer (CLIP)")


def _load_local_dir(folder: Path):
    """A BiomedCLIP-style folder. open_clip asks the hub for the text tower's config by
    name, so when the folder holds that config (config.json, vocab.txt) we point the
    text tower at the folder itself and the load never touches the network."""
    import open_clip

    cfg_path, ckpt = folder / "open_clip_config.json", folder / "open_clip_pytorch_model.bin"
    if not folder.is_dir():
        raise UserError(f"the local-dir folder {folder} does not exist: check the path after local-dir:")
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no open_clip_config.json: a local-dir backbone needs "
                        f"open_clip_config.json and open_clip_pytorch_model.bin (see README)")
    if not ckpt.is_file():
        found = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.bin"))
        if not found:
            raise UserError(f"{folder} has no open_clip_pytorch_model.bin (or .safetensors weights)")
        ckpt = folder / found[0]
    try:
        config = json.loads(cfg_path.read_text())
        model_cfg, pre = config["model_cfg"], config.get("preprocess_cfg", {})
        assert isinstance(model_cfg, dict) and isinstance(pre, dict), "model_cfg and preprocess_cfg must be objects"
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise UserError(f"{cfg_path} is not a valid open_clip config ({e})") from None
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        if not ((folder / "config.json").is_file() and (folder / "vocab.txt").is_file()):
            raise UserError(f"{folder} needs the text model's config.json and vocab.txt for an offline "
                            f"load (from the hub repository {text_cfg['hf_model_name']})")
        text_cfg.update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
    try:
        if "hf_model_name" in text_cfg:
            model = open_clip.model.CustomTextCLIP(**model_cfg)
            tokenizer = open_clip.tokenizer.HFTokenizer(str(folder), context_length=text_cfg.get("context_length", 77))
        else:
            model = open_clip.model.CLIP(**model_cfg)
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    except Exception as e:  # a config of the wrong shape: open_clip raises whatever its constructors raise
        raise UserError(f"{cfg_path} does not describe an open_clip model ({type(e).__name__}: {one_line(e)})") from None
    try:
        open_clip.load_checkpoint(model, str(ckpt), weights_only=True)
    except Exception as e:
        raise UserError(f"could not load weights from {ckpt} ({one_line(e)})") from None
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return model, tokenizer, size, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)


# Small vocabularies for the random BERT towers: whole common words, then characters and
# word-piece characters, so every word tokenises (into characters when it is rare).
_WORDS = ("a an the of in on with and or to is are as by at from for this that photo image "
          "scan ct mr ultrasound x-ray brain lung kidney skin knee colon breast retina tumor "
          "normal disc square stripes checker shape texture colour color round red green blue").split()
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:-()'/%+!?\"&*=<>[]_")


def _bert_vocab(size=None):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys(specials + _WORDS + _CHARS + ["##" + c for c in _CHARS]))
    if size:
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


def _tiny_vit_name():
    """A 4-block, 64-wide ViT on 32x32 images, registered with timm on first use."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    name = "vit_medvl_tiny_patch8_32"
    if not timm.is_model(name):
        def vit_medvl_tiny_patch8_32(pretrained=False, **kw):
            arch = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0)
            kw["pretrained_cfg"] = kw.get("pretrained_cfg") or {"architecture": name}  # no weights: no warning
            return _create_vision_transformer(name, pretrained=pretrained, **dict(arch, **kw))
        vit_medvl_tiny_patch8_32.__module__ = "timm.models.vision_transformer"
        register_model(vit_medvl_tiny_patch8_32)
    return name


def _build_random(name):
    """tiny, tiny-clip or biomedclip-random: built offline, random weights, same every time."""
    import open_clip

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        if name == "tiny-clip":
            cfg = dict(embed_dim=32,
                       vision_cfg=dict(image_size=32, layers=4, width=64, patch_size=8, head_width=32),
                       text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=2, layers=2))
            return open_clip.model.CLIP(**cfg), open_clip.tokenizer.SimpleTokenizer(context_length=77), 32, OPENAI_MEAN, OPENAI_STD
        full = name == "biomedclip-random"
        vocab = _bert_vocab(30522 if full else None)
        bert = dict(model_type="bert", architectures=["BertModel"], vocab_size=len(vocab),
                    hidden_size=768 if full else 64, num_hidden_layers=12 if full else 2,
                    num_attention_heads=12 if full else 2, intermediate_size=3072 if full else 128,
                    hidden_act="gelu", max_position_embeddings=512 if full else 128, type_vocab_size=2,
                    layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1,
                    # BERT's 0.02 leaves a tiny random tower blind to its input (every text gives
                    # the same feature); a wider init makes tiny's text features differ
                    initializer_range=0.02 if full else 0.3)
        Path(tmp, "config.json").write_text(json.dumps(bert))
        Path(tmp, "vocab.txt").write_text("\n".join(vocab) + "\n")
        Path(tmp, "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
        size, context = (224, 256) if full else (32, 128)
        cfg = dict(embed_dim=512 if full else 32,
                   vision_cfg=dict(timm_model_name="vit_base_patch16_224" if full else _tiny_vit_name(),
                                   timm_model_pretrained=False, timm_pool="", timm_proj="linear",
                                   image_size=size),
                   text_cfg=dict(hf_model_name=tmp, hf_tokenizer_name=tmp, hf_proj_type="mlp",
                                 hf_pooler_type="cls_last_hidden_state_pooler", hf_model_pretrained=False,
                                 context_length=context))
        model = open_clip.model.CustomTextCLIP(**cfg)
        tokenizer = open_clip.tokenizer.HFTokenizer(tmp, context_length=context)
        return model, tokenizer, size, OPENAI_MEAN, OPENAI_STD


# --------------------------------------------------------------------------- text features
@torch.no_grad()
def encode_sentences(backbone: Backbone, sentences, batch_size: int = 128):
    """Normalised frozen text features of a list of sentences: (n, E), computed in batches."""
    feats = [backbone.encode_text(backbone.tokenize(sentences[i:i + batch_size]))
             for i in range(0, len(sentences), batch_size)]
    return F.normalize(torch.cat(feats).float(), dim=-1)


def class_text_features(backbone: Backbone, sentences_per_class):
    """One normalised feature per sentence, grouped by class: C tensors (m_c, E), from one pass."""
    flat = [s for sentences in sentences_per_class for s in sentences]
    feats = encode_sentences(backbone, flat)
    return list(torch.split(feats, [len(s) for s in sentences_per_class]))


def class_centroids(backbone: Backbone, sentences_per_class):
    """Normalised mean of each class's normalised sentence features: (C, E)."""
    return F.normalize(torch.stack([f.mean(0) for f in class_text_features(backbone, sentences_per_class)]), dim=-1)


def zero_shot_logits(image_features, class_features, logit_scale: float):
    """Scaled cosine similarities: (B, E) x (C, E) -> (B, C)."""
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).t()


# --------------------------------------------------------------------------- seeding, device, autocast
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """bf16 autocast on CUDA; fp32 (no autocast) otherwise."""
    if precision == "bf16":
        if device.type != "cuda":
            raise UserError("--precision bf16 needs a CUDA device; use --precision fp32 on the CPU")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- metrics
def classification_metrics(logits, labels, num_classes: int, n_bins: int = 15) -> dict:
    """Accuracy, macro-F1, balanced accuracy and expected calibration error (all in %),
    and the confusion matrix (rows: true class, columns: predicted class)."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp, support, predicted = cm.diag().float(), cm.sum(1).float(), cm.sum(0).float()
    present = support > 0
    recall = tp / support.clamp(min=1)
    precision = tp / predicted.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    # ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size
    correct = (pred == labels).float()
    bins = torch.clamp((conf * n_bins).ceil().long() - 1, 0, n_bins - 1)
    ece = sum((bins == b).float().mean() * (correct[bins == b].mean() - conf[bins == b].mean()).abs()
              for b in range(n_bins) if (bins == b).any())
    return {"accuracy": 100 * correct.mean().item(), "macro_f1": 100 * f1[present].mean().item(),
            "balanced_accuracy": 100 * recall[present].mean().item(), "ece": 100 * float(ece),
            "n": len(labels), "confusion_matrix": cm.tolist()}


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


if __name__ == "__main__":  # the commands that lived here before this file was split
    moved = {"zeroshot": "zeroshot.py", "summarize": "report.py"}.get(sys.argv[1] if len(sys.argv) > 1 else "")
    if not moved:
        sys.exit("common.py is a library: run zeroshot.py, report.py RUNS_DIR, or a method with --check-setup")
    print(f"note: `python common.py {sys.argv[1]}` moved to `python {moved}`; it goes in the next release",
          file=sys.stderr)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name(moved)), *sys.argv[2:]])
