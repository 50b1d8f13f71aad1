"""The run machinery: everything around a method's training that is not the method.

Boundary: a method file decides what is trained and how it is scored; this module decides
where a run lives and how it survives: the command line built from the method's `Args`
dataclass (each field carries its own range, and whether it may change on --resume or at
--eval-only), run folders and their locks, atomic writes, checkpoints and --resume, metrics.json
and confusion.png, --eval-only, --predict, the --benchmark timing, the --check-setup preflight
of a sweep, and Ctrl-C. It knows no method's flags by name. Imports run one way:
method files -> runner -> data -> common.

Sections, in order: arguments (`arg`, `RunArgs`, `parse_args`, `validate_args`); run folders
(`run_dir`, `RunFolder`, `start_run`, `check_resume`); checkpoints and --resume; what a run
prints; --eval-only; files (atomic writes, `write_metrics`, confusion.png); the command line
(`run_cli`, the hub check); the benchmark harness; prediction (`Predictor`, `predict_cli`);
the setup check.
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import math
import operator
import os
import platform
import random
import re
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from filelock import FileLock, Timeout

import common
import data
from common import BIOMEDCLIP, OneLineParser, UserError, autocast, resolve_device
from data import ctrl_c_held


class Interrupted(Exception):
    """Ctrl-C during training; its message says what was kept. The CLIs print it and exit 130."""


# --------------------------------------------------------------------------- arguments
def arg(default, help: str, choices=None, *, at_least=None, above=None, below=None, at_most=None,
        resume_may_differ: bool = False, eval_option: bool = False, metavar=None, hidden: bool = False):
    """A field of a method's Args dataclass, with its own semantics:
    default and --help line; `choices`; the allowed range (`at_least`/`at_most` inclusive,
    `above`/`below` exclusive; an int field with a bound must be a whole number; every float must
    be finite); `resume_may_differ`: a change is allowed on --resume (it does not change the
    numbers); `eval_option`: given at --eval-only, it wins over the run's own value; `hidden`
    keeps a test-only flag out of --help."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "at_least": at_least, "above": above, "below": below,
        "at_most": at_most, "resume_may_differ": resume_may_differ, "eval_option": eval_option,
        "metavar": metavar, "hidden": hidden})


def list_arg(kind, help: str, nargs: str = "*", metavar=None, **semantics):
    """A list field of an Args dataclass (empty by default): `--flag A B C`; nargs "+" when the
    flag, once given, needs at least one value. `semantics` as in `arg`."""
    field = arg(None, help, metavar=metavar, **semantics)
    return dataclasses.field(default_factory=list, metadata={**field.metadata, "type": kind, "nargs": nargs})


def default_workers() -> int:
    """Data-loader processes: the usable CPUs, at most 4 (the numbers do not depend on it)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, usable)


@dataclasses.dataclass
class RunArgs:
    """The run machinery's flags, shared by both methods (so their help is identical): where the data
    is, what to do with a run, how to run it. A method's `Args` subclasses this and adds the
    experiment and its own knobs, listed first in --help."""
    root: str = arg("data", "folder holding the benchmark datasets", metavar="DIR", resume_may_differ=True,
                    eval_option=True)
    download: bool = arg(False, "fetch a missing benchmark dataset", resume_may_differ=True, eval_option=True)
    eval_only: str = arg("", "evaluate a finished run; rewrite its metrics.json", metavar="RUN_DIR",
                         resume_may_differ=True)
    predict: list = list_arg(str, "classify images or folders with a finished run", nargs="+",
                             metavar=("RUN_DIR", "IMAGE"), resume_may_differ=True)
    predictions: str = arg("", "with --predict: also write a CSV row per image", metavar="CSV",
                           resume_may_differ=True)
    check_setup: list = list_arg(str, "check a sweep's setup for these datasets, then exit", metavar="DATASET",
                                 resume_may_differ=True)
    resume: bool = arg(False, "continue an interrupted run from its checkpoint", resume_may_differ=True)
    overwrite: bool = arg(False, "replace the run in its folder once the new one has a checkpoint",
                          resume_may_differ=True)
    stop_after_epoch: int = arg(0, "testing: stop after this epoch", at_least=0, resume_may_differ=True, hidden=True)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N", resume_may_differ=True, eval_option=True)
    precision: str = arg("fp32", "fp32, or bf16 autocast on CUDA", ["fp32", "bf16"], eval_option=True)
    workers: int = arg(default_workers(), "data loader processes (the numbers do not depend on it)", at_least=0,
                       resume_may_differ=True, eval_option=True)
    benchmark: bool = arg(False, "time a training step and evaluation against the bare towers; print JSON",
                          resume_may_differ=True)
    out: str = arg("runs", "folder of run folders", metavar="DIR", resume_may_differ=True)


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's help line, then its default when it says something (not "", [], none, off)."""

    def _get_help_string(self, action):
        default = action.default
        says_nothing = default is None or default is False or (isinstance(default, (str, list)) and not default)
        if action.help is argparse.SUPPRESS or says_nothing or action.nargs == 0:
            return action.help
        return f"{action.help} (default: {default})"


def build_parser(args_cls, description: str = "", prog=None) -> argparse.ArgumentParser:
    """argparse from a dataclass: field `foo_bar` becomes `--foo-bar`; a bool (off by default)
    becomes a switch; list fields take several values; fields defaulting to None accept `none`."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=HelpFormatter)
    run_flags = {f.name for f in dataclasses.fields(RunArgs)}
    for f in sorted(dataclasses.fields(args_cls), key=lambda f: f.name in run_flags):  # the method's own first
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        help_ = argparse.SUPPRESS if meta.get("hidden") else meta.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        common = {"default": default, "help": help_}
        if meta.get("metavar") or f.type in (int, float):  # N for a whole number, X for a real one
            common["metavar"] = meta.get("metavar") or ("N" if f.type is int else "X")
        if isinstance(default, bool):
            common.pop("metavar", None)
            parser.add_argument(flag, action="store_true" if not default else argparse.BooleanOptionalAction,
                                **common)
        elif isinstance(default, list):
            kind = meta.get("type") or (type(default[0]) if default else int)
            parser.add_argument(flag, nargs=meta.get("nargs", "*"), type=kind, **common)
        elif default is None:
            parser.add_argument(flag, type=_none_or_number, choices=meta.get("choices"), **common)
        else:
            parser.add_argument(flag, type=type(default), choices=meta.get("choices"), **common)
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


def parse_args(args_cls, argv=None, description: str = "", prog=None):
    return args_cls(**vars(build_parser(args_cls, description, prog).parse_args(argv)))


BOUNDS = {"at_least": (">=", operator.ge), "above": (">", operator.gt), "below": ("<", operator.lt),
          "at_most": ("<=", operator.le)}  # the range keywords of `arg`: their sign and their test


def validate_args(args) -> None:
    """Check every field against the range its `arg` declares, before anything is loaded: whole
    numbers where a bounded int is expected, every real number finite (a NaN would train to
    chance without a word)."""
    for f in dataclasses.fields(args):
        value, meta, flag = getattr(args, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, not {value}")
        bounds = [(meta[k], k) for k in BOUNDS if meta.get(k) is not None]
        if value is None or not bounds:
            continue
        if f.type in (int, "int") and type(value) is not int:
            raise UserError(f"{flag} must be a whole number, not {value}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{flag} must be a number, not {value}")
        if not all(BOUNDS[k][1](value, b) for b, k in bounds):
            wanted = " and ".join(f"{BOUNDS[k][0]} {b}" for b, k in bounds)
            kind = "a whole number" if type(value) is int and f.type in (int, "int") else "a number"
            raise UserError(f"{flag} must be {kind} {wanted}, not {value}")


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
    suffix = "_base2novel" if subsample == "base" else ""
    return (Path(out) / backbone_folder(backbone) / method / data.dataset_key(dataset) / f"{shots}shot{suffix}"
            / f"seed{seed}")


def _lock_folder(path: Path) -> FileLock:
    """An exclusive lock on a run folder for this process's life, kept outside it (in the temporary
    folder) so that a run that fails to start leaves nothing behind."""
    name = hashlib.sha1(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    lock = FileLock(Path(tempfile.gettempdir()) / f"medvl-run-{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another run is writing to {path} right now: wait for it, or pass --out to "
                        f"write elsewhere") from None
    return lock


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


def check_resume(saved_args: dict, args) -> None:
    """Refuse to resume with a setting that changes the numbers: every field whose `arg` does not
    say `resume_may_differ` (precision included)."""
    changed = [f"--{f.name.replace('_', '-')} {saved_args.get(f.name)} -> {getattr(args, f.name)}"
               for f in dataclasses.fields(args)
               if not f.metadata.get("resume_may_differ") and saved_args.get(f.name) != getattr(args, f.name)]
    if changed:
        raise UserError(f"--resume with different settings ({', '.join(changed)}) than the checkpoint; "
                        f"use the run's settings or --overwrite")


def start_run(args, folder_of):
    """What a training run checks before anything is loaded: the shared arguments, the device and
    precision, the run folder `folder_of(args)` (never clobbered), and with --resume the checkpoint
    and its settings. A folder dataset is recorded by its absolute path. Returns (args, device,
    RunFolder, checkpoint or None)."""
    args = dataclasses.replace(args, dataset=data.dataset_arg(args.dataset))
    data.check_out_folder(args.dataset, args.out)
    folder = folder_of(args)
    validate_args(args)
    if getattr(args, "predictions", ""):
        raise UserError("--predictions names the CSV of --predict RUN_DIR IMAGES...: give --predict too")
    device = resolve_device(args.device)
    autocast(args.precision, device)  # refuses bf16 without CUDA
    run = RunFolder(folder, args.overwrite, args.resume)
    return args, device, run, resume_checkpoint(run, args) if args.resume else None


# --------------------------------------------------------------------------- checkpoints and --resume
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


def training_state(model, args, epoch, optimizer, scheduler, class_text, history=()) -> dict:
    """The checkpoint both methods write after every epoch: all that --resume needs to continue
    with exactly the numbers of an uninterrupted run, and the class names and class text that
    --predict needs (weights_only loadable)."""
    return {"trainable": trainable_state(model), "args": dataclasses.asdict(args), "script": script_of(type(args)),
            "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_state(), "history": list(history), "classnames": list(class_text["classes"]),
            "class_text": class_text}


def resume_checkpoint(run: "RunFolder", args) -> dict:
    """The checkpoint --resume continues from; a missing one is an error, not a fresh start."""
    ckpt = load_checkpoint(run.path)
    check_resume(ckpt["args"], args)
    run.saved_epoch = ckpt["epoch"]
    return ckpt


def restore_training_state(ckpt: dict, model, optimizer, scheduler) -> int:
    """Put a training_state back; returns the first epoch still to train."""
    load_trainable(model, ckpt["trainable"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    print(f"resuming after epoch {ckpt['epoch']}")
    return ckpt["epoch"] + 1


# --------------------------------------------------------------------------- what a run prints
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
    """The final line of a run: accuracy, macro-F1, ECE and the test images (n) of each evaluation
    block, the HM, and the method's extras (BiomedAP's robustness drop, BioMedVR's gate)."""
    keys = [k for k in ("test", "base", "novel") if k in metrics]
    text = " ".join(f"{k} acc {metrics[k]['accuracy']:.2f} f1 {metrics[k]['macro_f1']:.2f} "
                    f"ece {metrics[k]['ece']:.2f} n {metrics[k]['n']}" for k in keys)
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


# --------------------------------------------------------------------------- --eval-only
def eval_only_args(cli, args_cls):
    """(checkpoint, arguments to evaluate with, the evaluation options this command line changed)."""
    validate_args(cli)
    ckpt, args = load_finished_run(cli.eval_only, args_cls)
    defaults = args_cls()
    given = {f.name: getattr(cli, f.name) for f in dataclasses.fields(cli)
             if f.metadata.get("eval_option") and getattr(cli, f.name) != getattr(defaults, f.name)}
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


# --------------------------------------------------------------------------- files: atomic writes, metrics.json, pictures
# What evaluation, prediction and summaries need from a finished run: the optimiser and random
# states are dropped when a run ends (for BiomedAP they double the folder's size).
FINISHED_CHECKPOINT_KEYS = ("trainable", "args", "script", "epoch", "history", "classnames", "class_text")


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
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: no .tmp is left behind


def atomic_write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def save_checkpoint(path: Path, state: dict):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint.
    `state` holds tensors, numbers, strings, lists and dicts only (weights_only loadable)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: no .tmp is left behind


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
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: no .tmp is left behind


def row_normalised(cm):
    """Each row (true class) of a confusion matrix divided by its count: recall on the diagonal."""
    cm = np.asarray(cm, dtype=float)
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


CONFUSION_COUNTS_UP_TO = 30  # classes: up to this many, each cell of confusion.png shows its count
CONFUSION_MATRIX_UP_TO = 50  # classes: above this many, a panel shows each class's accuracy as a bar instead
CONFUSION_PANEL_INCHES = 9   # the largest side of a panel (at 100 dpi); at most 3 panels a row


def plot_confusion(metrics: dict, path: Path, classnames=None):
    """confusion.png: a panel per block (test, base, novel, ...), three at most in a row. Its size
    and the time to draw it stay bounded whatever the class count: the confusion matrix coloured
    by row share with each cell's count up to CONFUSION_COUNTS_UP_TO classes, without the counts
    up to CONFUSION_MATRIX_UP_TO, and above that each class's accuracy (its recall) as a bar; a
    panel is at most CONFUSION_PANEL_INCHES a side."""
    blocks = {k: v for k, v in metrics.items() if isinstance(v, dict) and "confusion_matrix" in v}
    if not blocks:
        return
    side = min(1.6 + 0.45 * max(len(v["confusion_matrix"]) for v in blocks.values()), CONFUSION_PANEL_INCHES)
    columns = min(len(blocks), 3)
    rows = math.ceil(len(blocks) / columns)
    fig = new_figure(side * columns, (side + 0.6) * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (block, m) in zip(axes, blocks.items()):
        cm = np.asarray(m["confusion_matrix"])
        C = len(cm)
        names = classnames.get(block) if isinstance(classnames, dict) else classnames
        names = list(names) if names is not None and len(names) == C else [str(i) for i in range(C)]
        share = row_normalised(cm)
        if C > CONFUSION_MATRIX_UP_TO:
            ax.bar(range(C), 100 * np.diag(share), width=1.0, color="C0")
            ax.set_xlim(-0.5, C - 0.5)
            ax.set_ylim(0, 100)
            ax.set_xlabel(f"class label 0..{C - 1} (the names are in metrics.json)", fontsize=8)
            ax.set_ylabel("accuracy of the class (%)", fontsize=8)
            ax.set_title(f"{block}: accuracy {m['accuracy']:.1f}%\n(each class's accuracy: {C} classes are too many "
                         "for a matrix)", fontsize=8)
            continue
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        counts = C <= CONFUSION_COUNTS_UP_TO
        for i in range(C if counts else 0):
            for j in range(C):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
        fontsize = 7 if counts else 5
        ax.set_xticks(range(C), names, rotation=45 if counts else 90, ha="right" if counts else "center",
                      fontsize=fontsize)
        ax.set_yticks(range(C), names, fontsize=fontsize)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{block}: accuracy {m['accuracy']:.1f}%\n(colour: row share{', text: count' if counts else ''})",
                     fontsize=8)
    for ax in axes[len(blocks):]:
        ax.set_axis_off()
    atomic_write_png(fig, path)


# --------------------------------------------------------------------------- the command line
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (HF_ENDPOINT, or the proxy in front of it)
    opens within `timeout` seconds. It runs in a thread: a stuck DNS lookup ignores socket timeouts."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address, connected = (url.hostname, url.port or (443 if url.scheme == "https" else 80)), []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            connected.append(True)
        except (OSError, UnicodeError):
            pass
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


def offline_unless_reachable(backbone: str) -> None:
    """Before a backbone that comes from the hub loads: when the hub cannot be reached, switch the
    hub library (and transformers through it) to offline mode for this process, so cached files
    load and missing ones fail at once with the backbone's recipe (common._load_open_clip)
    instead of after half a minute of retries."""
    from huggingface_hub import constants

    full = common.ALIASES.get(backbone, backbone)
    needs_hub = ":" in full and not full.startswith("local-dir:") and backbone not in common.RANDOM_BACKBONES
    if needs_hub and not constants.HF_HUB_OFFLINE and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries that read the environment, not the constant


def run_cli(main, args_cls, description: str = "", argv=None):
    """Parse the arguments, run `main(args)` (or, with --check-setup, only `check_setup`); a
    UserError becomes one line and exit 2, Ctrl-C one line and exit 130 (the shell's code for SIGINT)."""
    args = parse_args(args_cls, argv, description)
    try:
        offline_unless_reachable(getattr(args, "backbone", ""))
        return check_setup(args) if getattr(args, "check_setup", None) else main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
        images = [data.open_image(str(im)) if isinstance(im, (str, Path)) else data.to_rgb(im) for im in images]
        x = torch.stack([self.transform(im) for im in images]).to(self.device)  # (B, 3, H, W)
        out = self.model(x)
        result = {"classnames": self.classnames, "probabilities": out["logits"].float().softmax(-1).cpu()}
        if self.extras is not None:
            result.update(self.extras(out, self.classnames))
        return result


def script_of(args_cls) -> str:
    """The file name of the script whose Args class this is ("biomedap.py"), also when it runs
    as __main__: a checkpoint records it, so a run is read by the script that wrote it."""
    return Path(sys.modules[args_cls.__module__].__file__).name


def load_finished_run(run_dir, args_cls):
    """The checkpoint and the training arguments of a finished run folder, for evaluation and
    prediction; refuses a run of the other method (naming the script that reads it) or one
    without its class names."""
    ckpt = load_checkpoint(run_dir)
    names = {f.name for f in dataclasses.fields(args_cls)}
    here, written_by = script_of(args_cls), ckpt.get("script")
    if written_by and written_by != here:
        raise UserError(f"{run_dir} holds a {written_by[:-3]} run, not a {here[:-3]} one: read it with "
                        f"python {written_by} (same flags)")
    foreign = sorted(set(ckpt.get("args", {})) - names)
    if "args" not in ckpt or foreign:
        raise UserError(f"{run_dir} was not written by {here} (it has {len(foreign)} setting(s) {here} does "
                        f"not know, e.g. --{foreign[0].replace('_', '-') if foreign else '?'}): use the script "
                        f"that trained it")
    if "classnames" not in ckpt or "class_text" not in ckpt:
        raise UserError(f"{run_dir} holds no class names (written by an older version): train it again")
    return ckpt, args_cls(**{k: v for k, v in ckpt["args"].items() if k in names})


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
    paths, rows = data.find_images(args.predict[1:]), []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        out = predictor(batch)
        extra_keys = [k for k in out if k not in ("classnames", "probabilities")]
        for i, (path, probs) in enumerate(zip(batch, out["probabilities"])):
            top = probs.topk(min(3, len(probs)))
            extras = {k: out[k][i] for k in extra_keys}
            print(f"{data.printable(path)}: " +
                  ", ".join(f"{predictor.classnames[c]} {p:.3f}" for p, c in zip(*top)) +
                  "".join(f"; {k.replace('_', ' ')} {v}" for k, v in extras.items()))
            rows.append({"path": data.printable(path), "predicted": predictor.classnames[int(top.indices[0])],
                         **{f"p({c})": f"{float(p):.6f}" for c, p in zip(predictor.classnames, probs)}, **extras})
    if args.predictions:
        target = Path(args.predictions)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # after a failure: no .tmp is left behind
        print(f"{len(rows)} predictions -> {data.printable(target)}")
    return rows


# --------------------------------------------------------------------------- setup check
def check_setup(args) -> None:
    """`--check-setup DATASET...`: what a sweep needs, checked once before its first job: these
    flags are valid, the backbone loads, and every dataset is there (downloaded once with
    --download), its images open and its class text covers its classes (`needs`: the fields of
    the class text this command uses)."""
    validate_args(args)
    backbone = common.load_backbone(args.backbone, "cpu")
    method = script_of(type(args))[:-3]  # the class text each command reads: data.CLASS_TEXT_ENCODES
    for name in args.check_setup:
        splits = data.load_splits(name, args.root, args.download)
        text = data.load_class_text(name, splits.classnames, args.root, method=method)
        data.check_text_fits(backbone, text, splits.classnames, data.CLASS_TEXT_ENCODES[method])
    print(f"setup ok: backbone {args.backbone}, datasets {' '.join(args.check_setup)}", file=sys.stderr)
