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
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem with the user's input; the CLIs print its message as one line and exit."""


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
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(
                f"could not load backbone '{full}' ({first}). Without access to the Hugging Face hub, "
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
    except (ValueError, KeyError) as e:
        raise UserError(f"{cfg_path} is not a valid open_clip config ({e})") from None
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        if not ((folder / "config.json").is_file() and (folder / "vocab.txt").is_file()):
            raise UserError(f"{folder} needs the text model's config.json and vocab.txt for an offline "
                            f"load (from the hub repository {text_cfg['hf_model_name']})")
        text_cfg.update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
        model = open_clip.model.CustomTextCLIP(**model_cfg)
        tokenizer = open_clip.tokenizer.HFTokenizer(str(folder), context_length=text_cfg.get("context_length", 77))
    else:
        model = open_clip.model.CLIP(**model_cfg)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    try:
        open_clip.load_checkpoint(model, str(ckpt), weights_only=True)
    except Exception as e:
        raise UserError(f"could not load weights from {ckpt} ({str(e).splitlines()[0][:200]})") from None
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
def arg(default, help: str, choices=None):
    """A field of a method's Args dataclass: its default, its --help line, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def build_parser(args_cls, description: str = "") -> argparse.ArgumentParser:
    """argparse from a dataclass: field `foo_bar` becomes `--foo-bar`; bools become
    `--foo/--no-foo`; list fields take several values; Optional fields accept `none`."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_cls):
        flag = "--" + f.name.replace("_", "-")
        help_, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(default, list):
            kind = type(default[0]) if default else int
            parser.add_argument(flag, nargs="*", type=kind, default=default, help=help_)
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
def run_dir(out: str, method: str, dataset: str, shots: int, seed: int, subsample: str = "all") -> Path:
    """runs/<method>/<dataset>/<K>shot[_base2novel]/seed<S>/"""
    suffix = "_base2novel" if subsample == "base" else ""
    return Path(out) / method / Path(dataset).name / f"{shots}shot{suffix}" / f"seed{seed}"


def prepare_run_dir(folder: Path, overwrite: bool, resume: bool) -> Path:
    """Refuse to clobber a finished or interrupted run unless asked."""
    done, ckpt = folder / "metrics.json", folder / "checkpoint.pt"
    if done.exists() and not overwrite:
        raise UserError(f"{folder} already holds a finished run; pass --overwrite to redo it "
                        f"or --out to write elsewhere")
    if ckpt.exists() and not (resume or overwrite):
        raise UserError(f"{folder} holds an unfinished run; pass --resume to continue it "
                        f"or --overwrite to start again")
    if overwrite and not resume:
        for f in (done, ckpt):
            f.unlink(missing_ok=True)
    return folder  # created by the first checkpoint, so a run that fails early leaves nothing


def atomic_write_json(path: Path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


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


def write_metrics(folder: Path, args, metrics: dict, timings: dict, extra: dict | None = None):
    record = {"args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
              "metrics": metrics, "timings": timings, "versions": library_versions(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}
    record.update(extra or {})
    atomic_write_json(Path(folder) / "metrics.json", record)
    return record


def run_cli(main, args_cls, description: str = "", argv=None):
    """Parse the arguments, run `main(args)`, and turn a UserError into one line and exit 2."""
    args = parse_args(args_cls, argv, description)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------- summaries
def _collect(root: Path):
    """{(method, dataset, shots, protocol): {seed: metrics}} from every metrics.json."""
    runs = {}
    for path in sorted(Path(root).glob("*/*/*shot*/seed*/metrics.json")):
        method, dataset, shot_dir, seed_dir = path.parts[-5:-1]
        shots, _, protocol = shot_dir.partition("shot")
        try:
            metrics = json.loads(path.read_text())["metrics"]
        except (ValueError, KeyError):
            print(f"skipping unreadable {path}", file=sys.stderr)
            continue
        key = (method, dataset, int(shots), "base2novel" if protocol else "fewshot")
        runs.setdefault(key, {})[int(seed_dir[4:])] = metrics
    return runs


def _mean_std(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def summarize(root="runs") -> str:
    """Tables per method: few-shot accuracy (datasets x shots, mean +- std over seeds and
    the average over datasets), base-to-novel (base, novel, true harmonic mean, and the
    arithmetic mean labelled as such, with and without BUSI), prompt robustness.
    Writes summary.md and summary.csv into `root` and returns the markdown."""
    root = Path(root)
    runs = _collect(root)
    lines, rows = [], [["method", "protocol", "dataset", "shots", "metric", "mean", "std", "seeds"]]
    for method in sorted({k[0] for k in runs}):
        few = {k: v for k, v in runs.items() if k[0] == method and k[3] == "fewshot"}
        if few:
            shots = sorted({k[2] for k in few})
            datasets = sorted({k[1] for k in few})
            lines += [f"## {method}: few-shot accuracy (%), mean ± std over seeds", "",
                      "| dataset | " + " | ".join(f"K={k}" for k in shots) + " |",
                      "|---|" + "---|" * len(shots)]
            per_shot = {k: [] for k in shots}
            for d in datasets:
                cells = []
                for k in shots:
                    seeds = few.get((method, d, k, "fewshot"), {})
                    if not seeds:
                        cells.append("–")
                        continue
                    m, s = _mean_std([r["test"]["accuracy"] for r in seeds.values()])
                    per_shot[k].append(m)
                    cells.append(f"{m:.2f} ± {s:.2f} ({len(seeds)})")
                    rows.append([method, "fewshot", d, k, "accuracy", f"{m:.4f}", f"{s:.4f}", len(seeds)])
                lines.append(f"| {d} | " + " | ".join(cells) + " |")
            lines.append("| **average** | " + " | ".join(
                f"{np.mean(v):.2f} ({len(v)} datasets)" if v else "–" for v in per_shot.values()) + " |")
            lines.append("")
            lines += _robustness_table(method, few, rows)
        b2n = {k: v for k, v in runs.items() if k[0] == method and k[3] == "base2novel"}
        if b2n:
            lines += [f"## {method}: base-to-novel accuracy (%), mean over seeds", "",
                      "| dataset | shots | base | novel | HM (harmonic) | arithmetic mean |", "|---|---|---|---|---|---|"]
            table = {}
            for (_, d, k, _), seeds in sorted(b2n.items()):
                base = np.mean([r["base"]["accuracy"] for r in seeds.values()])
                novel = np.mean([r["novel"]["accuracy"] for r in seeds.values()])
                table[d] = (base, novel)
                lines.append(f"| {d} | {k} | {base:.2f} | {novel:.2f} | {harmonic_mean(base, novel):.2f} | "
                             f"{(base + novel) / 2:.2f} |")
                rows += [[method, "base2novel", d, k, "base", f"{base:.4f}", "", len(seeds)],
                         [method, "base2novel", d, k, "novel", f"{novel:.4f}", "", len(seeds)]]
            for label, keep in (("average", lambda d: True), ("average without BUSI", lambda d: d != "busi")):
                vals = [v for d, v in table.items() if keep(d)]
                if vals:
                    base, novel = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
                    mean_hm = np.mean([harmonic_mean(*v) for v in vals])
                    lines.append(f"| **{label}** ({len(vals)}) | | {base:.2f} | {novel:.2f} | "
                                 f"{harmonic_mean(base, novel):.2f} (mean of per-dataset HM {mean_hm:.2f}) | "
                                 f"{(base + novel) / 2:.2f} |")
            lines.append("")
    text = "\n".join(lines) if lines else f"no finished runs under {root}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.md").write_text(text + "\n")
    with open(root / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return text


def _robustness_table(method, few, rows):
    robust = {k: v for k, v in few.items() if all("robustness" in r for r in v.values())}
    if not robust:
        return []
    names = list(next(iter(next(iter(robust.values())).values()))["robustness"]["accuracy"])
    lines = [f"## {method}: accuracy (%) under prompt perturbations, mean over seeds", "",
             "| dataset | shots | " + " | ".join(names) + " | mean drop |", "|---|---|" + "---|" * (len(names) + 1)]
    for (_, d, k, _), seeds in sorted(robust.items()):
        acc = [np.mean([r["robustness"]["accuracy"][n] for r in seeds.values()]) for n in names]
        drop = np.mean([r["robustness"]["mean_drop"] for r in seeds.values()])
        lines.append(f"| {d} | {k} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {drop:.2f} |")
        rows.append([method, "robustness", d, k, "mean_drop", f"{drop:.4f}", "", len(seeds)])
    return lines + [""]


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

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "summarize":
        print(summarize(sys.argv[2] if len(sys.argv) > 2 else "runs"))
    else:
        print("usage: python common.py summarize [RUNS_DIR]", file=sys.stderr)
        sys.exit(2)
