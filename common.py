"""What both methods share: the frozen backbone and the seams inside its towers, text
features, argument parsing, seeding, metrics, run folders, checkpoints, summaries and the
benchmark harness.

Backbones (`load_backbone`):
    biomedclip          hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    clip                OpenAI CLIP ViT-B/16 through open_clip
    hf-hub:ORG/REPO     any open_clip model on the Hugging Face hub
    local-dir:PATH      a folder with open_clip_config.json and open_clip_pytorch_model.bin
                        (for a Hugging Face text tower also its config.json and vocab.txt)
    MODEL:PRETRAINED    an open_clip built-in name and pretrained tag, e.g. ViT-B-16:openai
    tiny, tiny-clip     small random models of the two tower families (tests, smoke runs)
    biomedclip-random   the full-size BiomedCLIP architecture with random weights (benchmarks)

Two tower families are supported, told apart by `Backbone.kind`:
    "timm-hf"   timm ViT image tower + Hugging Face BERT text tower (BiomedCLIP)
    "openclip"  open_clip's own ViT and causal text transformer (OpenAI CLIP)

Symbols: B batch, C classes, L tokens, N patches, D tower width, E joint embedding width.
"""
import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input; the CLIs print its message as one line and exit."""


class Interrupted(Exception):
    """Ctrl-C during training; its message says what was kept. The CLIs print it and exit 130."""


def one_line(error: BaseException) -> str:
    """An exception's whole message on one line (a library's multi-line text, joined)."""
    return " ".join(str(error).split()) or type(error).__name__


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
    """

    def __init__(self, model, tokenizer, name, kind, image_size, mean, std):
        self.model, self.tokenizer, self.name, self.kind = model, tokenizer, name, kind
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        model.eval()
        model.requires_grad_(False)
        if kind == "timm-hf":
            self.num_blocks = len(model.visual.trunk.blocks)
            self.image_width = model.visual.trunk.embed_dim
            self.text_width = model.text.config.hidden_size
            self.pad_id = model.text.config.pad_token_id
        else:
            self.num_blocks = len(model.visual.transformer.resblocks)
            self.image_width = model.visual.transformer.width
            self.text_width = model.transformer.width
            self.pad_id = 0
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
    import open_clip  # imported here: it takes seconds, and `--help` should not wait for it

    full = ALIASES.get(name, name)
    if name in RANDOM_BACKBONES:
        model, tokenizer, size, mean, std = _build_random(name)
    elif full.startswith("local-dir:"):
        model, tokenizer, size, mean, std = _load_local_dir(Path(full[len("local-dir:"):]))
    else:
        logging.disable(logging.ERROR)  # open_clip logs each failure; ours is the one line below
        try:
            if full.startswith("hf-hub:"):
                model, tokenizer = open_clip.create_model(full), open_clip.get_tokenizer(full)
            elif ":" in full:
                arch, tag = full.split(":", 1)
                model, tokenizer = open_clip.create_model(arch, pretrained=tag), open_clip.get_tokenizer(arch)
            else:
                raise UserError(f"unknown backbone '{name}': use biomedclip, clip, "
                                f"{', '.join(RANDOM_BACKBONES)}, hf-hub:ORG/REPO, local-dir:PATH "
                                f"or an open_clip MODEL:PRETRAINED name")
        except UserError:
            raise
        except Exception as e:  # network, missing weights, unknown tag: one line, with the way out
            raise UserError(
                f"could not load backbone '{full}' ({one_line(e)}). Without access to the Hugging Face hub, "
                f"download the model repository's files into a folder (open_clip_config.json, "
                f"open_clip_pytorch_model.bin, and for BiomedCLIP the text model's config.json and "
                f"vocab.txt) and pass --backbone local-dir:FOLDER") from None
        finally:
            logging.disable(logging.NOTSET)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size, mean, std = cfg.get("size", 224), cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
    size = size[0] if isinstance(size, (tuple, list)) else size
    kind = _tower_kind(model)
    return Backbone(model.to(device), tokenizer, name, kind, size, mean, std)


def _tower_kind(model) -> str:
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(model.visual, TimmModel) and isinstance(getattr(model, "text", None), HFTextEncoder):
        if getattr(model.visual.trunk, "global_pool", "token") != "token":
            raise UserError("this backbone's timm image tower does not pool the class token; "
                            "only class-token ViTs are supported")
        return "timm-hf"
    if isinstance(model.visual, VisionTransformer) and hasattr(model, "token_embedding"):
        return "openclip"
    raise UserError(f"unsupported towers ({type(model.visual).__name__} + "
                    f"{type(getattr(model, 'text', model)).__name__}); supported: timm ViT + "
                    f"Hugging Face text (BiomedCLIP) and open_clip ViT + text transformer (CLIP)")


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
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS + _CHARS + ["##" + c for c in _CHARS]
    vocab = list(dict.fromkeys(vocab))
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
    """One normalised feature per sentence, grouped by class: a list of C tensors (m_c, E).
    All sentences go through the tower together, once."""
    flat = [s for sentences in sentences_per_class for s in sentences]
    feats = encode_sentences(backbone, flat)
    return list(torch.split(feats, [len(s) for s in sentences_per_class]))


def class_centroids(backbone: Backbone, sentences_per_class):
    """Normalised mean of each class's normalised sentence features: (C, E)."""
    return F.normalize(torch.stack([f.mean(0) for f in class_text_features(backbone, sentences_per_class)]), dim=-1)


def zero_shot_logits(image_features, class_features, logit_scale: float):
    """Scaled cosine similarities: (B, E) x (C, E) -> (B, C)."""
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(class_features, dim=-1).t()


# --------------------------------------------------------------------------- arguments
def arg(default, help: str, choices=None, hidden: bool = False):
    """A field of a method's Args dataclass: its default, its --help line, its choices; `hidden`
    keeps a test-only flag out of --help."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "hidden": hidden})


def list_arg(kind, help: str, nargs: str = "*"):
    """A list field of an Args dataclass (empty by default): `--flag A B C`; nargs "+" when the
    flag, once given, needs at least one value."""
    return dataclasses.field(default_factory=list, metadata={"help": help, "type": kind, "nargs": nargs})


class OneLineParser(argparse.ArgumentParser):
    """argparse that answers a bad command line with one line (not the whole usage) and exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(args_cls, description: str = "") -> argparse.ArgumentParser:
    """argparse from a dataclass: field `foo_bar` becomes `--foo-bar`; bools become
    `--foo/--no-foo`; list fields take several values; Optional fields accept `none`."""
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_cls):
        flag = "--" + f.name.replace("_", "-")
        help_, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        if f.metadata.get("hidden"):  # test-only flags work but stay out of --help
            help_ = argparse.SUPPRESS
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, list):
            kind = f.metadata.get("type") or (type(default[0]) if default else int)
            parser.add_argument(flag, nargs=f.metadata.get("nargs", "*"), type=kind, default=default, help=help_)
        elif default is None:
            parser.add_argument(flag, type=_none_or_number, default=None, help=help_, choices=choices)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_, choices=choices)
    return parser


def _none_or_number(text):
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(args_cls, argv=None, description: str = ""):
    return args_cls(**vars(build_parser(args_cls, description).parse_args(argv)))


# --------------------------------------------------------------------------- determinism, device
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global random states, in a form torch.load(weights_only=True) accepts."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


# --------------------------------------------------------------------------- run folders
DEFAULT_BACKBONE = "biomedclip"


def backbone_folder(backbone: str) -> str:
    """The folder level that keeps runs on different backbones apart: "" for BiomedCLIP (the
    default), otherwise the backbone's name with each character outside [A-Za-z0-9._-] as "_"
    (run.sh computes the same)."""
    if backbone in (DEFAULT_BACKBONE, BIOMEDCLIP):
        return ""
    return re.sub(r"[^A-Za-z0-9._-]", "_", backbone)


def run_dir(out: str, method: str, dataset: str, shots: int, seed: int, subsample: str = "all",
            backbone: str = DEFAULT_BACKBONE) -> Path:
    """runs/[<backbone>/]<method>/<dataset>/<K>shot[_base2novel]/seed<S>/: everything that changes
    the numbers and is not a hyper-parameter is in the path, so a sweep never mistakes one run for
    another (`method` carries a variant, e.g. biomedap-official)."""
    import data  # data.py imports this module: a top-level import would be circular
    suffix = "_base2novel" if subsample == "base" else ""
    return (Path(out) / backbone_folder(backbone) / method / data.dataset_key(dataset) / f"{shots}shot{suffix}"
            / f"seed{seed}")


def _lock_folder(path: Path):
    """An exclusive lock on a run folder for this process's life, kept outside it (in the temporary
    folder) so that a run that fails to start leaves nothing behind."""
    import fcntl
    import hashlib
    name = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    handle = open(Path(tempfile.gettempdir()) / f"medvl-run-{name}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"another run is writing to {path} right now: wait for it, or pass --out to "
                        f"write elsewhere") from None
    return handle


class RunFolder:
    """A run's folder. It appears with the run's first checkpoint, so a run that fails to start
    leaves nothing behind. With --overwrite the new run writes into a sibling staging folder that
    replaces the old run only once the new run has a checkpoint of its own: a restart that fails
    (a backbone that does not load, a missing dataset, a wrong flag) never loses a finished result."""

    def __init__(self, path: Path, overwrite: bool = False, resume: bool = False):
        path = Path(path)
        done, ckpt = path / "metrics.json", path / "checkpoint.pt"
        if done.exists() and not overwrite:
            raise UserError(f"{path} already holds a finished run; pass --overwrite to redo it "
                            f"or --out to write elsewhere")
        if ckpt.exists() and not (resume or overwrite):
            raise UserError(f"{path} holds an unfinished run; pass --resume to continue it "
                            f"or --overwrite to start again")
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: pass one of them")
        self.path = path
        self._lock = _lock_folder(path)
        self.staging = path.with_name(path.name + ".overwrite") if overwrite and path.exists() else None
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)  # left by a restart that failed: never a result

    def save_checkpoint(self, state: dict):
        """Write the checkpoint; the first one of an --overwrite run then takes the old run's place.
        Ctrl-C waits until it is written (and the folders are swapped)."""
        try:
            with ctrl_c_held():
                if self.staging is None:
                    save_checkpoint(self.path / "checkpoint.pt", state)
                else:
                    save_checkpoint(self.staging / "checkpoint.pt", state)
                    replaced = self.path.with_name(self.path.name + ".replaced")
                    shutil.rmtree(replaced, ignore_errors=True)
                    os.replace(self.path, replaced)      # two renames: the old run is never deleted before
                    os.replace(self.staging, self.path)  # the new one is in place, and the gap is microseconds
                    shutil.rmtree(replaced)
                    self.staging = None
                self.saved_epoch = state.get("epoch")
        except KeyboardInterrupt:
            self.phase = "saved"  # the Ctrl-C came while this epoch's checkpoint was written
            raise

    saved_epoch = 0  # the epoch of the checkpoint on disk: set by each save, and on resume
    phase = "training"  # or "saved" (Ctrl-C held by a checkpoint's write), "evaluation", "results"

    @contextmanager
    def stop_on_ctrl_c(self):
        """Around a run from its first epoch to its last line: Ctrl-C becomes one line saying which
        checkpoint is kept. The results are written under `ctrl_c_held`, so an interrupt that comes
        while they are written ends the run only once they are complete."""
        try:
            yield
        except KeyboardInterrupt:
            epoch = self.saved_epoch + 1
            if self.phase == "results":
                message = f"interrupted while the results were written; they were completed first in {self.path}"
            elif self.phase == "saved":
                message = (f"interrupted after epoch {self.saved_epoch}; its checkpoint is kept in {self.path}; "
                           f"continue with --resume")
            elif self.phase == "evaluation":
                message = (f"interrupted during evaluation; the checkpoint of epoch {self.saved_epoch} (the last) "
                           f"is kept in {self.path}; evaluate it with --resume")
            elif self.saved_epoch:
                message = (f"interrupted during epoch {epoch}; the checkpoint of epoch {self.saved_epoch} "
                           f"is kept in {self.path}; continue with --resume")
            else:
                kept = f"; the previous run in {self.path} is kept" if self.staging is not None else ""
                message = f"interrupted during epoch 1, before the first checkpoint{kept}"
            raise Interrupted(message) from None


@contextmanager
def ctrl_c_held():
    """Ctrl-C inside the block waits for its end and is raised there (main thread only: elsewhere
    the block runs as it is). For writes that must finish once they start."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def prepare_run_dir(folder: Path, overwrite: bool, resume: bool) -> RunFolder:
    """Refuse to clobber a finished or interrupted run unless asked (see RunFolder)."""
    return RunFolder(folder, overwrite, resume)


# Arguments that may differ when a run is resumed: where it writes and reads, how this invocation
# is steered, the device (the numbers agree to float rounding) and the options that only change
# evaluation. Every other field changes the numbers, so --resume refuses any change to it.
RESUME_MAY_DIFFER = frozenset({
    "out", "root", "download", "resume", "overwrite", "eval_only", "benchmark", "stop_after_epoch",
    "device", "eval_every", "robustness", "infer_context", "test_batch_size", "predict", "predictions"})


def check_resume(saved_args: dict, args) -> None:
    """Refuse to resume with a setting that changes the numbers (workers and precision included)."""
    changed = [f"--{f.name.replace('_', '-')} {saved_args.get(f.name)} -> {getattr(args, f.name)}"
               for f in dataclasses.fields(args)
               if f.name not in RESUME_MAY_DIFFER and saved_args.get(f.name) != getattr(args, f.name)]
    if changed:
        raise UserError(f"--resume with different settings ({', '.join(changed)}) than the checkpoint; "
                        f"use the run's settings or --overwrite")


def start_run(args, folder_of):
    """What a training run checks before anything is loaded: the shared arguments, the device and
    precision, the run folder `folder_of(args)` (never clobbered), and with --resume the checkpoint
    and its settings. A folder dataset is recorded by its absolute path. Returns (args, device,
    RunFolder, checkpoint or None)."""
    import data
    args = dataclasses.replace(args, dataset=data.dataset_arg(args.dataset))
    folder = folder_of(args)
    validate_args(args)
    if getattr(args, "predictions", ""):
        raise UserError("--predictions names the CSV of --predict RUN_DIR IMAGES...: give --predict too")
    device = resolve_device(args.device)
    autocast(args.precision, device)  # refuses bf16 without CUDA
    run = prepare_run_dir(folder, args.overwrite, args.resume)
    return args, device, run, resume_checkpoint(run, args) if args.resume else None


def trainable_state(model) -> dict:
    """The learnable tensors of a method's model, on the CPU: what a run keeps."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict):
    own = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(own):
        raise UserError(f"the checkpoint holds {', '.join(sorted(state))[:200]}, but this model learns "
                        f"{', '.join(sorted(own))[:200]}: it is not a run of this method and these settings")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state[name])


def training_state(model, args, epoch, optimizer, scheduler, loader, class_text, history=()) -> dict:
    """The checkpoint both methods write after every epoch: all that --resume needs to continue
    with exactly the numbers of an uninterrupted run, and the class names and class text that
    --predict needs (weights_only loadable)."""
    return {"trainable": trainable_state(model), "args": dataclasses.asdict(args), "epoch": epoch,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "loader_generator": loader.generator.get_state(), "history": list(history),
            "classnames": list(class_text["classes"]), "class_text": class_text}


def resume_checkpoint(run: "RunFolder", args) -> dict:
    """The checkpoint --resume continues from; a missing one is an error, not a fresh start."""
    ckpt = load_checkpoint(run.path)
    check_resume(ckpt["args"], args)
    run.saved_epoch = ckpt["epoch"]
    return ckpt


def restore_training_state(ckpt: dict, model, optimizer, scheduler, loader) -> int:
    """Put a training_state back; returns the first epoch still to train."""
    load_trainable(model, ckpt["trainable"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    loader.generator.set_state(ckpt["loader_generator"])
    print(f"resuming after epoch {ckpt['epoch']}")
    return ckpt["epoch"] + 1


def describe_trainable(model, group=()) -> str:
    """"trainable: name (shape) ..., = N parameters;" for the start of a run; the tensors of a
    module listed in `group` (e.g. each fusion module) are counted as one entry."""
    entries = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = ".".join(name.split(".")[:2]) if name.split(".")[0] in group else name
            entries.setdefault(key, []).append(p)
    listed = ", ".join(f"{k} {tuple(ps[0].shape) if len(ps) == 1 else f'({len(ps)} tensors)'}"
                       for k, ps in entries.items())
    return f"trainable: {listed} = {sum(p.numel() for ps in entries.values() for p in ps):,} parameters;"


def summary_line(metrics: dict) -> str:
    """The final line of a run: accuracy, macro-F1 and ECE of each evaluation block, the HM, and
    the method's extras (BiomedAP's robustness drop, BioMedVR's gate)."""
    keys = [k for k in ("test", "base", "novel") if k in metrics]
    text = " ".join(f"{k} acc {metrics[k]['accuracy']:.2f} f1 {metrics[k]['macro_f1']:.2f} "
                    f"ece {metrics[k]['ece']:.2f}" for k in keys)
    if "harmonic_mean" in metrics:
        text += f" HM {metrics['harmonic_mean']:.2f}"
    if "robustness" in metrics:
        text += f" robustness mean drop {metrics['robustness']['mean_drop']:.2f}"
    if "gate" in metrics:
        text += f" gate {metrics['gate'][0]:.3f}/{metrics['gate'][1]:.3f}"
    return text


def check_finite(terms: dict, epoch: int):
    """Stop a run whose loss is no longer a number (the checkpoint of the last epoch is kept)."""
    if not math.isfinite(terms["loss"]):
        raise UserError(f"the loss became {terms['loss']} in epoch {epoch}: lower --lr (the checkpoint of "
                        f"the previous epoch, if any, is kept)")


def epoch_line(epoch: int, epochs: int, stats: dict, seconds: float, extra: str = "") -> str:
    """The line both methods print after each epoch: the epoch, each loss term, the training
    accuracy, the learning rate of the epoch's last step, the method's extras, the seconds."""
    terms = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k not in ("train_accuracy", "lr"))
    return (f"epoch {epoch}/{epochs} {terms} train_acc {stats['train_accuracy']:.2f} lr {stats['lr']:.4g}"
            f"{' ' + extra if extra else ''} time {seconds:.1f}s")


# Options of --eval-only that may differ from the run's own: where the data is, how to run, and
# what to evaluate. Given on the command line, they win over the saved arguments.
EVAL_OPTIONS = ("root", "download", "device", "precision", "workers", "test_batch_size", "robustness",
                "infer_context")


def eval_only_args(cli, args_cls):
    """(checkpoint, arguments to evaluate with, the evaluation options this command line changed)."""
    validate_args(cli)
    ckpt, args = load_finished_run(cli.eval_only, args_cls)
    defaults = args_cls()
    given = {k: getattr(cli, k) for k in EVAL_OPTIONS
             if hasattr(cli, k) and getattr(cli, k) != getattr(defaults, k)}
    return ckpt, dataclasses.replace(args, **given), given


def write_eval_only(folder, args, metrics: dict, eval_s: float, given: dict, extra: dict, classnames):
    """--eval-only in both methods: the new metrics replace the old ones in metrics.json (others,
    e.g. BioMedVR's test-selected best, are kept), with the options given recorded."""
    folder = Path(folder)
    old = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    timings = {**old.get("timings", {}), "eval_s": eval_s}
    record = write_metrics(folder, args, {**old.get("metrics", {}), **metrics}, timings,
                           {**extra, "evaluated_with": given}, classnames)
    finish_checkpoint(folder)
    return record


# The whole-number arguments and their smallest allowed value (None: the method's default).
MINIMUM = {"shots": 1, "epochs": 1, "batch_size": 1, "test_batch_size": 1, "seed": 0, "workers": 0,
           "stop_after_epoch": 0, "eval_every": 0, "n_ctx": 1, "n_prompts": 1, "prompt_tokens": 1,
           "fusion_heads": 1, "num_attr": 1, "topk": 1, "min_chars": 0}
# The real-number arguments and their allowed interval: (low, high, low included).
INTERVAL = {"lr": (0, math.inf, False), "warmup_lr": (0, math.inf, False), "momentum": (0, 1, True),
            "weight_decay": (0, math.inf, True), "fusion_dropout": (0, 1, True), "alpha": (0, math.inf, True),
            "beta": (0, math.inf, True), "lambda_high": (0, math.inf, True), "lambda_kl": (0, math.inf, True),
            "lambda_low": (0, math.inf, True), "lambda_align": (0, math.inf, True)}


def validate_args(args) -> None:
    """Check the arguments before anything is loaded, the same way in both methods: whole numbers
    in range, every real number finite (a NaN would train to chance without a word)."""
    for name, low in MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and (type(value) is not int or value < low):
            raise UserError(f"--{name.replace('_', '-')} must be a whole number >= {low}, not {value}")
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
        if f.name in INTERVAL and value is not None:
            low, high, closed = INTERVAL[f.name]
            if not (low <= value < high if closed else low < value < high):
                raise UserError(f"--{f.name.replace('_', '-')} must be in {'[' if closed else '('}{low}, {high}), "
                                f"not {value}")


# What evaluation, prediction and summaries need from a finished run: the optimiser and random
# states are dropped when a run ends (for BiomedAP they double the folder's size).
FINISHED_CHECKPOINT_KEYS = ("trainable", "args", "epoch", "history", "classnames", "class_text")


def finish_checkpoint(path: Path):
    """Rewrite a finished run's checkpoint with only FINISHED_CHECKPOINT_KEYS (atomically)."""
    state = load_checkpoint(path)
    if set(state) <= set(FINISHED_CHECKPOINT_KEYS):
        return  # already finished: leave the file as it is
    save_checkpoint(Path(path) / "checkpoint.pt" if Path(path).is_dir() else path,
                    {k: state[k] for k in FINISHED_CHECKPOINT_KEYS if k in state})


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def save_checkpoint(path: Path, state: dict):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint.
    `state` holds tensors, numbers, strings, lists and dicts only (weights_only loadable)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train the run first (or check the path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not ours ({type(e).__name__}); "
                        f"delete it and train again") from None


def library_versions() -> dict:
    import open_clip
    import timm
    import torchvision
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "transformers": transformers.__version__, "numpy": np.__version__}


def write_metrics(folder: Path, args, metrics: dict, timings: dict, extra: dict | None = None,
                  classnames=None):
    """metrics.json, and confusion.png beside it (one panel per block of `metrics` that has a
    confusion matrix). `classnames` labels the axes: a list for every block of that many
    classes, or {block: list} (base-to-novel: base and novel classes differ)."""
    record = {"args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
              "metrics": metrics, "timings": timings, "versions": library_versions(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}
    record.update(extra or {})
    atomic_write_json(Path(folder) / "metrics.json", record)
    plot_confusion(metrics, Path(folder) / "confusion.png", classnames)
    return record


def new_figure(width, height):
    """A matplotlib figure drawn by the Agg backend: no display, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def atomic_write_png(fig, path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def row_normalised(cm):
    """Each row (true class) of a confusion matrix divided by its count: recall on the diagonal."""
    cm = np.asarray(cm, dtype=float)
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


def plot_confusion(metrics: dict, path: Path, classnames=None):
    """confusion.png: a panel per block (test, base, novel, ...), coloured by row share."""
    blocks = {k: v for k, v in metrics.items() if isinstance(v, dict) and "confusion_matrix" in v}
    if not blocks:
        return
    sizes = [len(v["confusion_matrix"]) for v in blocks.values()]
    side = 1.6 + 0.45 * max(sizes)
    fig = new_figure(side * len(blocks), side + 0.6)
    for ax, (block, m) in zip(fig.subplots(1, len(blocks), squeeze=False)[0], blocks.items()):
        cm = np.asarray(m["confusion_matrix"])
        C = len(cm)
        names = classnames.get(block) if isinstance(classnames, dict) else classnames
        names = list(names) if names is not None and len(names) == C else [str(i) for i in range(C)]
        share = row_normalised(cm)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(C):
            for j in range(C):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(C), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(C), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{block}: accuracy {m['accuracy']:.1f}%\n(colour: row share, text: count)", fontsize=8)
    atomic_write_png(fig, path)


def run_cli(main, args_cls, description: str = "", argv=None):
    """Parse the arguments, run `main(args)`; a UserError becomes one line and exit 2, Ctrl-C one
    line and exit 130 (the shell's code for SIGINT)."""
    args = parse_args(args_cls, argv, description)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# --------------------------------------------------------------------------- zero-shot
# BiomedCLIP's published zero-shot accuracy (%) on each dataset's full test split, for
# `python common.py zeroshot` to print beside the measured one. Only figures read from the
# BiomedCoOp paper (Koleilat et al., CVPR 2025, arXiv 2411.15232) belong here, with the
# table they come from; a dataset without a verified figure is left out rather than guessed.
# Its per-dataset zero-shot rows could not be retrieved on the machines this was written on
# (see the README, "Zero-shot baseline"), so no dataset has one yet.
PUBLISHED_ZERO_SHOT: dict[str, float] = {}


@dataclasses.dataclass
class ZeroShotArgs:
    dataset: str = arg("btmri", "benchmark name, synthetic, or a folder with one sub-folder per class")
    backbone: str = arg("biomedclip", "frozen backbone (see common.py)")
    root: str = arg("data", "folder holding the benchmark datasets")
    download: bool = arg(False, "fetch a missing benchmark dataset from the Hugging Face hub")
    device: str = arg("auto", "cpu, cuda, cuda:N or auto")
    out: str = arg("runs", "results go to OUT/zeroshot/<dataset>/seed1/")
    overwrite: bool = arg(False, "replace a finished zero-shot result")
    batch_size: int = arg(100, "images per forward pass")
    workers: int = arg(4, "data loader worker processes")


@torch.no_grad()
def encode_images(backbone: Backbone, loader):
    """Frozen image features (n, E) and labels (n,) of every batch of `loader`."""
    from tqdm import tqdm

    feats, labels = [], []
    for images, y in tqdm(loader, desc="encode test images", leave=False, disable=None):
        feats.append(backbone.encode_image(images.to(backbone.device)).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def zeroshot(args: ZeroShotArgs) -> dict:
    """The frozen backbone on the test split, with no training: each image goes to the class
    whose text feature is nearest. Two class features, from one pass over the images:
      test          the dataset's clinical template with the class name ("a MR photo of a
                    glioma tumor in the brain.")
      descriptions  the normalised mean of the class's expert descriptions (BiomedAP's high anchor)
    Writes OUT/zeroshot/<dataset>/seed1/metrics.json (one seed: nothing here is random)."""
    import data
    from data import ImageDataset, build_transform, load_class_text, load_splits, make_loader

    validate_args(args)
    folder = Path(args.out) / backbone_folder(args.backbone) / "zeroshot" / data.dataset_key(args.dataset) / "seed1"
    if (folder / "metrics.json").exists() and not args.overwrite:
        raise UserError(f"{folder} already holds a zero-shot result; pass --overwrite to redo it "
                        f"or --out to write elsewhere")
    device = resolve_device(args.device)
    start = time.perf_counter()
    backbone = load_backbone(args.backbone, device)
    splits = load_splits(args.dataset, args.root, args.download, image_size=backbone.image_size)
    names = splits.classnames
    text = load_class_text(args.dataset, names, args.root)
    transform = build_transform(backbone.image_size, backbone.mean, backbone.std)
    loader = make_loader(ImageDataset(splits.test, transform), args.batch_size, False, 1, args.workers)
    encode_start = time.perf_counter()
    feats, labels = encode_images(backbone, loader)  # (n, E), (n,)
    encode_s = time.perf_counter() - encode_start
    template = encode_sentences(backbone, [text["template"].format(c) for c in names])  # (C, E)
    described = class_centroids(backbone, [text["classes"][c]["descriptions"] for c in names])  # (C, E)
    metrics = {name: classification_metrics(zero_shot_logits(feats, classes, backbone.logit_scale), labels,
                                            len(names))
               for name, classes in (("test", template), ("descriptions", described))}
    timings = {"encode_s": encode_s, "total_s": time.perf_counter() - start}
    write_metrics(folder, args, metrics, timings, {"classnames": names}, classnames=names)
    published = PUBLISHED_ZERO_SHOT.get(data.dataset_key(args.dataset))
    print(f"zero-shot {splits.name} ({args.backbone}, {metrics['test']['n']} test images): "
          f"template {metrics['test']['accuracy']:.2f}, descriptions {metrics['descriptions']['accuracy']:.2f}"
          + (f"; published BiomedCLIP {published:.2f}" if published is not None else "")
          + f" -> {folder / 'metrics.json'}")
    return metrics


# --------------------------------------------------------------------------- summaries
def _run_key(parts):
    """(folder, method, dataset, shots, protocol, seed) from the parts of a metrics.json path
    below the summarised folder, or None when it is not in a run folder:
        <folder>/<method>/<dataset>/<K>shot[_base2novel]/seed<S>/metrics.json
        <folder>/zeroshot/<dataset>/seed<S>/metrics.json            (shots 0)
    <folder> is whatever lies above (empty, "smoke/tiny", ...)."""
    *dirs, seed_dir, _ = parts
    if not (seed_dir.startswith("seed") and seed_dir[4:].isdigit()):
        return None
    if len(dirs) >= 3:
        shots, found, protocol = dirs[-1].partition("shot")
        if found and shots.isdigit() and protocol in ("", "_base2novel"):
            return ("/".join(dirs[:-3]), dirs[-3], dirs[-2], int(shots),
                    "base2novel" if protocol else "fewshot", int(seed_dir[4:]))
    if len(dirs) >= 2 and dirs[-2] == "zeroshot":
        return "/".join(dirs[:-2]), "zeroshot", dirs[-1], 0, "zeroshot", int(seed_dir[4:])
    return None


def _collect(root: Path):
    """{(folder, method, dataset, shots, protocol): {seed: metrics}} from every metrics.json at
    any depth below `root`. Runs are kept apart by the folder above <method>, so runs of the
    same method and dataset made in two places (two backbones, say) never share a cell."""
    runs = {}
    for path in sorted(Path(root).rglob("metrics.json")):
        key = _run_key(path.relative_to(root).parts)
        if key is None:
            print(f"skipping {path}: not in a <method>/<dataset>/<K>shot/seed<S>/ folder", file=sys.stderr)
            continue
        try:
            metrics = json.loads(path.read_text())["metrics"]
            blocks = ("test",) if key[4] != "base2novel" else ("base", "novel")
            assert all(isinstance(metrics[b]["accuracy"], (int, float)) for b in blocks)
        except (ValueError, KeyError, TypeError, IndexError, AssertionError):
            print(f"skipping {path}: not a readable metrics.json", file=sys.stderr)
            continue
        runs.setdefault(key[:5], {})[key[5]] = metrics
    return runs


def _label(folder, method):
    return f"{folder}/{method}" if folder else method


def _mean_std(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def summarize(root="runs") -> str:
    """Tables per folder and method: zero-shot (template and description scoring), few-shot
    accuracy (datasets x shots with the zero-shot column at K=0, mean +- std over seeds and the
    average over datasets), base-to-novel (base, novel, true harmonic mean, and the arithmetic
    mean labelled as such, with and without BUSI), prompt robustness. Runs are found at any
    depth and grouped by the folder above <method> (shown in each heading).
    Writes summary.md, summary.csv, fewshot.png and (with base-to-novel runs) base2novel.png
    into `root` and returns the markdown."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the folder that holds the run folders (default: runs)")
    runs = _collect(root)
    folders = sorted({k[0] for k in runs})
    counts = {f: sum(len(v) for k, v in runs.items() if k[0] == f) for f in folders}
    lines = [f"Read {sum(counts.values())} runs under {root}: "
             + ", ".join(f"{f or '.'} ({n})" for f, n in counts.items()), ""]
    rows = [["folder", "method", "protocol", "dataset", "shots", "metric", "mean", "std", "seeds"]]
    for folder in folders:
        zero = {k[2]: v for k, v in runs.items() if k[0] == folder and k[3:] == (0, "zeroshot")}
        lines += _zero_shot_table(folder, zero, rows)
        for method in sorted({k[1] for k in runs if k[0] == folder} - {"zeroshot"}):
            label = _label(folder, method)
            few = {k: v for k, v in runs.items() if k[:2] == (folder, method) and k[4] == "fewshot"}
            if few:
                lines += _fewshot_table(folder, method, few, zero, rows)
                lines += _robustness_table(folder, method, few, rows)
            b2n = {k: v for k, v in runs.items() if k[:2] == (folder, method) and k[4] == "base2novel"}
            if b2n:
                lines += [f"## {label}: base-to-novel accuracy (%), mean over seeds", "",
                          "| dataset | shots | base | novel | HM (harmonic) | arithmetic mean |",
                          "|---|---|---|---|---|---|"]
                table = {}
                for (_, _, d, k, _), seeds in sorted(b2n.items()):
                    base = np.mean([r["base"]["accuracy"] for r in seeds.values()])
                    novel = np.mean([r["novel"]["accuracy"] for r in seeds.values()])
                    table[d] = (base, novel)
                    lines.append(f"| {d} | {k} | {base:.2f} | {novel:.2f} | {harmonic_mean(base, novel):.2f} | "
                                 f"{(base + novel) / 2:.2f} |")
                    rows += [[folder, method, "base2novel", d, k, "base", f"{base:.4f}", "", len(seeds)],
                             [folder, method, "base2novel", d, k, "novel", f"{novel:.4f}", "", len(seeds)]]
                for name, keep in (("average", lambda d: True), ("average without BUSI", lambda d: d != "busi")):
                    vals = [v for d, v in table.items() if keep(d)]
                    if vals:
                        base, novel = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
                        mean_hm = np.mean([harmonic_mean(*v) for v in vals])
                        lines.append(f"| **{name}** ({len(vals)}) | | {base:.2f} | {novel:.2f} | "
                                     f"{harmonic_mean(base, novel):.2f} (mean of per-dataset HM {mean_hm:.2f}) | "
                                     f"{(base + novel) / 2:.2f} |")
                lines.append("")
    text = "\n".join(lines) if runs else f"no finished runs under {root}"
    atomic_write_text(root / "summary.md", text + "\n")
    with open(root / "summary.csv.tmp", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(root / "summary.csv.tmp", root / "summary.csv")
    series = fewshot_series(runs)
    if series:
        plot_fewshot(series, root / "fewshot.png")
    bars = base2novel_series(runs)
    if bars:
        plot_base2novel(bars, root / "base2novel.png")
    return text


def _zero_shot_table(folder, zero, rows):
    if not zero:
        return []
    published = any(d in PUBLISHED_ZERO_SHOT for d in zero)
    lines = [f"## {_label(folder, 'zeroshot')}: zero-shot accuracy (%) of the frozen backbone", "",
             "| dataset | clinical template | mean of expert descriptions |" + (" published BiomedCLIP |" if published else ""),
             "|---|---|---|" + ("---|" if published else "")]
    for d, seeds in sorted(zero.items()):
        cells = []
        for block in ("test", "descriptions"):
            m, s = _mean_std([r[block]["accuracy"] for r in seeds.values()])
            cells.append(f"{m:.2f}")
            rows.append([folder, "zeroshot", "zeroshot", d, 0, "accuracy" if block == "test" else "descriptions_accuracy",
                         f"{m:.4f}", f"{s:.4f}", len(seeds)])
        if published:
            cells.append(f"{PUBLISHED_ZERO_SHOT[d]:.2f}" if d in PUBLISHED_ZERO_SHOT else "–")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines + [""]


def _fewshot_table(folder, method, few, zero, rows):
    """Datasets x shots; the first column is the zero-shot run of the same folder (template)."""
    shots = sorted({k[3] for k in few})
    datasets = sorted({k[2] for k in few})
    lines = [f"## {_label(folder, method)}: few-shot accuracy (%), mean ± std over seeds (K=0: zero-shot)", "",
             "| dataset | K=0 | " + " | ".join(f"K={k}" for k in shots) + " |", "|---|---|" + "---|" * len(shots)]
    per_shot = {k: [] for k in [0, *shots]}
    for d in datasets:
        cells = []
        for k in [0, *shots]:
            seeds = zero.get(d, {}) if k == 0 else few.get((folder, method, d, k, "fewshot"), {})
            if not seeds:
                cells.append("–")
                continue
            m, s = _mean_std([r["test"]["accuracy"] for r in seeds.values()])
            per_shot[k].append(m)
            cells.append(f"{m:.2f}" if k == 0 else f"{m:.2f} ± {s:.2f} ({len(seeds)})")
            if k:
                rows.append([folder, method, "fewshot", d, k, "accuracy", f"{m:.4f}", f"{s:.4f}", len(seeds)])
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(
        f"{np.mean(v):.2f} ({len(v)} dataset{'s' if len(v) > 1 else ''})" if v else "–" for v in per_shot.values()) + " |")
    return lines + [""]


def _robustness_table(folder, method, few, rows):
    robust = {k: v for k, v in few.items() if all("robustness" in r for r in v.values())}
    if not robust:
        return []
    names = list(next(iter(next(iter(robust.values())).values()))["robustness"]["accuracy"])
    lines = [f"## {_label(folder, method)}: accuracy (%) under prompt perturbations, mean over seeds", "",
             "| dataset | shots | " + " | ".join(names) + " | mean drop |", "|---|---|" + "---|" * (len(names) + 1)]
    for (_, _, d, k, _), seeds in sorted(robust.items()):
        acc = [np.mean([r["robustness"]["accuracy"][n] for r in seeds.values()]) for n in names]
        drop = np.mean([r["robustness"]["mean_drop"] for r in seeds.values()])
        lines.append(f"| {d} | {k} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {drop:.2f} |")
        rows.append([folder, method, "robustness", d, k, "mean_drop", f"{drop:.4f}", "", len(seeds)])
    return lines + [""]


def fewshot_series(runs) -> dict:
    """What fewshot.png plots: {panel: {label: [(shots, mean, low, high), ...]}}. A panel is a
    dataset, or "average" when there are several; a label is "<folder>/<method>", or
    "<folder>/zero-shot" with one point at K=0 (template scoring); low and high are the min
    and max over seeds. The average panel averages the datasets that have each K; its spread
    is over the per-seed averages when those datasets share their seeds, else none."""
    accuracy = {}  # label -> dataset -> shots -> {seed: accuracy}
    for (folder, method, d, k, protocol), seeds in runs.items():
        if protocol != "base2novel":
            label = _label(folder, "zero-shot" if protocol == "zeroshot" else method)
            accuracy.setdefault(label, {}).setdefault(d, {})[k] = {s: r["test"]["accuracy"] for s, r in seeds.items()}
    several = len({d for by_dataset in accuracy.values() for d in by_dataset}) > 1
    series = {}
    for label, by_dataset in sorted(accuracy.items()):
        for d, by_shots in by_dataset.items():
            series.setdefault(d, {})[label] = [(k, float(np.mean(list(a.values()))), min(a.values()), max(a.values()))
                                               for k, a in sorted(by_shots.items())]
        if several:
            points = []
            for k in sorted({k for by_shots in by_dataset.values() for k in by_shots}):
                per_dataset = [by_shots[k] for by_shots in by_dataset.values() if k in by_shots]
                mean = float(np.mean([np.mean(list(a.values())) for a in per_dataset]))
                seeds = [set(a) for a in per_dataset]
                if all(s == seeds[0] for s in seeds):
                    per_seed = [np.mean([a[s] for a in per_dataset]) for s in seeds[0]]
                    points.append((k, mean, float(min(per_seed)), float(max(per_seed))))
                else:
                    points.append((k, mean, mean, mean))
            series.setdefault("average", {})[label] = points
    return series


def plot_fewshot(series: dict, path: Path):
    """One panel per dataset (and the average): accuracy against K, a line per method with
    min-max error bars over seeds, the zero-shot runs as stars at K=0."""
    panels = sorted(p for p in series if p != "average") + (["average"] if "average" in series else [])
    shots = sorted({pt[0] for by_label in series.values() for pts in by_label.values() for pt in pts})
    labels = sorted({label for by_label in series.values() for label in by_label})
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_cols = min(len(labels), max(ncols, 2))  # about one "<folder>/<method>" per 3 inches
    fig = new_figure(max(3.0 * ncols, 4.5), 2.5 * nrows + 0.2 * math.ceil(len(labels) / legend_cols) + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for label, points in series[panel].items():
            k, mean, low, high = (np.array(v) for v in zip(*points))
            zero = label.split("/")[-1] == "zero-shot"
            ax.errorbar([shots.index(s) for s in k], mean, yerr=[mean - low, high - mean], color=colour[label],
                        marker="*" if zero else "o", markersize=10 if zero else 4, linestyle="none" if zero else "-",
                        capsize=2, label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xticks(range(len(shots)), [str(s) for s in shots], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("shots K (0: zero-shot)", fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=legend_cols, fontsize=7)
    atomic_write_png(fig, path)


def base2novel_series(runs) -> dict:
    """What base2novel.png plots: {"<folder>/<method>": [(name, base, novel, HM), ...]}, means
    over seeds per dataset (name "<dataset> K=<shots>") and, with several datasets, their
    average with the true harmonic mean of the averaged base and novel accuracy, as in the table."""
    bars = {}
    for (folder, method, d, k, protocol), seeds in sorted(runs.items()):
        if protocol == "base2novel":
            base = float(np.mean([r["base"]["accuracy"] for r in seeds.values()]))
            novel = float(np.mean([r["novel"]["accuracy"] for r in seeds.values()]))
            bars.setdefault(_label(folder, method), []).append((f"{d} K={k}", base, novel, harmonic_mean(base, novel)))
    for entries in bars.values():
        if len(entries) > 1:
            base, novel = float(np.mean([e[1] for e in entries])), float(np.mean([e[2] for e in entries]))
            entries.append(("average", base, novel, harmonic_mean(base, novel)))
    return bars


def plot_base2novel(bars: dict, path: Path):
    """A panel per folder/method: base, novel and harmonic-mean bars for each dataset."""
    width = max(len(entries) for entries in bars.values())
    fig = new_figure(1.5 + 0.9 * width, 2.6 * len(bars) + 0.4)
    for ax, (label, entries) in zip(fig.subplots(len(bars), 1, squeeze=False)[:, 0], bars.items()):
        x = np.arange(len(entries))
        for i, name in enumerate(("base", "novel", "HM")):
            ax.bar(x + (i - 1) * 0.27, [e[i + 1] for e in entries], 0.27, label=name, color=f"C{i}")
        ax.set_xticks(x, [e[0] for e in entries], rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.set_title(f"{label}: base-to-novel", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    atomic_write_png(fig, path)


# --------------------------------------------------------------------------- benchmark
# (warm-up, timed repetitions) per device type: CUDA steps of a few milliseconds need more of
# both (kernel selection and the caching allocator settle during warm-up), a CPU step of the
# full-size towers takes seconds.
BENCHMARK_REPS = {"cpu": (1, 3), "cuda": (10, 50)}


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu: " and the processor's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return "cpu: " + (names[0] if names else platform.processor() or platform.machine())


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak allocated since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_ms(fn, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after warm-up, synchronising CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def benchmark_report(device: torch.device, precision: str, step, floor, infer, infer_floor,
                     eval_images: int, trainable_parameters: int, extra: dict | None = None) -> dict:
    """Time a training step against its floor (the bare frozen towers doing the unavoidable
    forward and backward) and inference against the bare towers' forward, in one process;
    print and return one JSON line with the same keys for every method (plus `extra`).

    `step` and `floor` open `autocast(precision, device)` around their forward themselves (the
    backward belongs outside it); `infer` and `infer_floor` (each on `eval_images` images) are
    run here under torch.no_grad() and that same autocast, so all four see one precision.
    peak_memory_mb is taken while timing the step (weights included)."""
    warmup, reps = BENCHMARK_REPS.get(device.type, BENCHMARK_REPS["cuda"])

    def no_grad(fn):
        def run():
            with torch.no_grad(), autocast(precision, device):
                fn()
        return run
    eval_ms = time_ms(no_grad(infer), device, warmup, reps)
    eval_floor_ms = time_ms(no_grad(infer_floor), device, warmup, reps)
    floor_ms = time_ms(floor, device, warmup, reps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = time_ms(step, device, warmup, reps)
    report = {"step_ms": round(step_ms, 2), "floor_ms": round(floor_ms, 2), "ratio": round(step_ms / floor_ms, 3),
              "eval_images_per_s": round(1000 * eval_images / eval_ms, 2),
              "eval_floor_images_per_s": round(1000 * eval_images / eval_floor_ms, 2),
              "eval_ratio": round(eval_ms / eval_floor_ms, 3),  # like ratio: the method's time over the floor's
              "peak_memory_mb": round(peak_memory_mb(device), 1), "trainable_parameters": trainable_parameters,
              "device": device_name(device), "precision": precision, "threads": torch.get_num_threads(),
              "warmup": warmup, "reps": reps, **(extra or {})}
    print(json.dumps(report))
    return report


# --------------------------------------------------------------------------- prediction
class Predictor:
    """A finished run, ready for new images: `predictor(images)` with a list of image paths or PIL
    images returns {"classnames": [...], "probabilities": (B, C)} plus the method's own
    per-image extras (e.g. BioMedVR's experts). Built by each method's `load_run(RUN_DIR)`."""

    def __init__(self, model, transform, classnames, device, extras=None):
        self.model, self.transform, self.classnames = model.eval(), transform, list(classnames)
        self.device, self.extras = torch.device(device), extras

    @torch.no_grad()
    def __call__(self, images):
        import data
        images = [data.open_image(str(im)) if isinstance(im, (str, Path)) else data.to_rgb(im) for im in images]
        x = torch.stack([self.transform(im) for im in images]).to(self.device)  # (B, 3, H, W)
        out = self.model(x)
        result = {"classnames": self.classnames, "probabilities": out["logits"].float().softmax(-1).cpu()}
        if self.extras is not None:
            result.update(self.extras(out, self.classnames))
        return result


def load_finished_run(run_dir, args_cls):
    """The checkpoint and the training arguments of a finished run folder, for evaluation and
    prediction; refuses a run of the other method or one without its class names."""
    ckpt = load_checkpoint(run_dir)
    names = {f.name for f in dataclasses.fields(args_cls)}
    foreign = sorted(set(ckpt.get("args", {})) - names)
    if "args" not in ckpt or foreign:
        raise UserError(f"{run_dir} was not written by this method (its arguments include "
                        f"{', '.join(foreign) or 'nothing'}): use the other method's script")
    if "classnames" not in ckpt or "class_text" not in ckpt:
        raise UserError(f"{run_dir} holds no class names (written by an older version): train it again")
    return ckpt, args_cls(**{k: v for k, v in ckpt["args"].items() if k in names})


def find_images(inputs) -> list:
    """Image files named on the command line: files as given, folders searched recursively."""
    import data
    found = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in data.IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{name} is neither an image file nor a folder")
    if not found:
        raise UserError(f"no image files ({', '.join(sorted(data.IMAGE_EXTENSIONS))}) in {' '.join(map(str, inputs))}")
    return found


def predict_cli(args, load_run, batch_size: int = 32):
    """`--predict RUN_DIR IMAGE_OR_FOLDER...`: the top 3 classes of each image, printed, and with
    `--predictions FILE.csv` one row per image (path, predicted class, every class's probability,
    the method's extras), written atomically."""
    validate_args(args)
    if args.predictions and Path(args.predictions).is_dir():
        raise UserError(f"--predictions {args.predictions} is a folder: give a file name, e.g. predictions.csv")
    if len(args.predict) < 2:
        raise UserError("--predict needs the run folder and then at least one image or folder: "
                        "--predict RUN_DIR IMAGE_OR_FOLDER...")
    predictor = load_run(args.predict[0], device=resolve_device(args.device))
    paths, rows = find_images(args.predict[1:]), []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        out = predictor(batch)
        extra_keys = [k for k in out if k not in ("classnames", "probabilities")]
        for i, (path, probs) in enumerate(zip(batch, out["probabilities"])):
            top = probs.topk(min(3, len(probs)))
            extras = {k: out[k][i] for k in extra_keys}
            print(f"{path}: " + ", ".join(f"{predictor.classnames[c]} {p:.3f}" for p, c in zip(*top)) +
                  "".join(f"; {k.replace('_', ' ')} {v}" for k, v in extras.items()))
            rows.append({"path": str(path), "predicted": predictor.classnames[int(top.indices[0])],
                         **{f"p({c})": f"{float(p):.6f}" for c, p in zip(predictor.classnames, probs)}, **extras})
    if args.predictions:
        target = Path(args.predictions)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, target)
        print(f"{len(rows)} predictions -> {target}")
    return rows


# --------------------------------------------------------------------------- setup check
def check_setup(argv=None):
    """`python common.py check --datasets A B [--method biomedap|biomedvr|zeroshot] FLAGS...`: what
    a sweep needs, checked once before its first job: the FLAGS every job will get parse and are
    valid for the method, the backbone loads, and every dataset is there (downloaded once with
    --download), its images open and its class text covers its classes."""
    import importlib

    import data
    parser = OneLineParser(prog="python common.py check", description=check_setup.__doc__)
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--method", choices=["biomedap", "biomedvr", "zeroshot"], default="zeroshot")
    args, flags = parser.parse_known_args(argv)
    args_cls = ZeroShotArgs if args.method == "zeroshot" else importlib.import_module(args.method).Args
    run_args = parse_args(args_cls, flags + ["--dataset", args.datasets[0]])
    validate_args(run_args)
    load_backbone(run_args.backbone, "cpu")
    for name in args.datasets:
        splits = data.load_splits(name, run_args.root, run_args.download)
        data.load_class_text(name, splits.classnames, run_args.root)
    print(f"setup ok: backbone {run_args.backbone}, datasets {' '.join(args.datasets)}", file=sys.stderr)


def cli(argv):
    """python common.py summarize [RUNS_DIR] | zeroshot ... | check ..."""
    try:
        if argv[:1] == ["summarize"]:
            print(summarize(argv[1] if len(argv) > 1 else "runs"))
        elif argv[:1] == ["zeroshot"]:
            run_cli(zeroshot, ZeroShotArgs, "zero-shot accuracy of the frozen backbone on the test split "
                    "(clinical template and expert descriptions)", argv[1:])
        elif argv[:1] == ["check"]:
            check_setup(argv[1:])
        else:
            print("usage: python common.py summarize [RUNS_DIR]\n"
                  "       python common.py zeroshot --dataset DATASET [--backbone ...] (--help for all)\n"
                  "       python common.py check --datasets A B [--method M] [FLAGS of the method...]",
                  file=sys.stderr)
            sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    import common  # the module data.py imports: its UserError is the class that gets raised
    common.cli(sys.argv[1:])
