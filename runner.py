"""The run machinery: everything around a method's training that is not the method.

Boundary: a method file decides what is trained and how it is scored; this module decides
where a run lives and how it survives. A method's `main()` hands it the method module
(`run_method`); from then on it builds the command line from the method's `Args` plus the
experiment and run flags every script shares, sets up the data, class text, backbone and model
through the method's functions (`setup`), trains with a checkpoint after each epoch (`train`),
and handles --resume, metrics.json and confusion.png, --eval-only, --predict, the --benchmark
timing, the questions a sweep asks (--check-setup, `finished_runs`), Ctrl-C and failed writes.
It knows no method's own flags by name. Imports run one way: runner -> classtext -> data -> common; method
files import only common.

Sections, in order: arguments (`RunArgs`, `ExperimentArgs`, `cli_args`, `parse_args`,
`validate_args`); run folders (`run_dir`, `check_writable`, `FolderLock`, `RunFolder`,
`run_identity`, `differing_settings`, `start_run`, `check_resume`); checkpoints and --resume;
what a run prints; --eval-only; files (atomic writes, `write_metrics`, confusion.png); a
method's run (`setup`, `train`, `eval_only`, `load_run`, `benchmark`, `run_method`); the command
line (`run_cli`, the hub check); the benchmark harness; prediction (`Predictor`, `predict_cli`,
`write_predictions`); a run's class text (`class_text`); a sweep's questions (`check_setup`,
`finished_runs`).
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
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import types
import urllib.request
import weakref
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from filelock import FileLock, Timeout

import classtext
import common
import data
from common import BIOMEDCLIP, OneLineParser, UserError, arg, autocast, list_arg, resolve_device
from data import ctrl_c_held


class Interrupted(Exception):
    """Ctrl-C during training; its message says what was kept. The CLIs print it and exit 130."""


class WriteFailed(UserError):
    """A file that could not be written (a full disk, a read-only folder): one line naming the path
    and the cause, e.g. "cannot write runs/.../checkpoint.pt: no space left on device"."""

    def __init__(self, path, error: OSError):
        cause = error.strerror or common.one_line(error)
        super().__init__(f"cannot write {data.printable(path)}: {cause[:1].lower()}{cause[1:]}")


# --------------------------------------------------------------------------- arguments
def default_workers() -> int:
    """Data-loader processes: the usable CPUs, at most 4 (the numbers do not depend on it)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, usable)


@dataclasses.dataclass
class ExperimentArgs:
    """What a run of either method is an experiment on, listed first in --help: `cli_args(method)`
    adds these to a method's own `Args`."""
    dataset: str = arg("btmri", "a benchmark (listed below), synthetic, or your own folder of class sub-folders")
    shots: int = arg(16, "K labelled training images per class", at_least=1)
    seed: int = arg(1, "seed of the few-shot subset, the initialisation and the data order", at_least=0)
    subsample: str = arg("all", "all: few-shot on every class; base: train on base classes, test base and novel",
                         ["all", "base"])
    backbone: str = arg("biomedclip", "frozen backbone: biomedclip, clip, hf-hub:ORG/REPO, local-dir:PATH, tiny")


@dataclasses.dataclass
class RunArgs:
    """The run machinery's flags, shared by both methods (so their help is identical): where the data
    is, what to do with a run, how to run it. `cli_args(method)` adds them to a method's own `Args`
    (the experiment and its knobs, listed first in --help)."""
    root: str = arg("data", "folder holding the benchmark datasets", metavar="DIR", resume_may_differ=True,
                    eval_option=True)
    download: bool = arg(False, "fetch a missing medical benchmark", resume_may_differ=True, eval_option=True)
    eval_only: str = arg("", "evaluate a finished run; rewrite its metrics.json", metavar="RUN_DIR",
                         resume_may_differ=True)
    predict: list = list_arg(str, "classify images or folders with a finished run", nargs="+",
                             metavar=("RUN_DIR", "IMAGE"), resume_may_differ=True)
    predictions: str = arg("", "with --predict: also write a CSV row per image", metavar="CSV",
                           resume_may_differ=True)
    check_setup: list = list_arg(str, "check a sweep's setup for these datasets, then exit", metavar="DATASET",
                                 resume_may_differ=True)
    resume: bool = arg(False, "continue an interrupted run from its checkpoint", resume_may_differ=True)
    overwrite: bool = arg(False, "replace the run in its folder once the new one has a checkpoint (with "
                          "--predict: an existing --predictions file)", resume_may_differ=True)
    stop_after_epoch: int = arg(0, "testing: stop after this epoch", at_least=0, resume_may_differ=True, hidden=True)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N", resume_may_differ=True, eval_option=True)
    precision: str = arg("fp32", "fp32, or bf16 autocast on CUDA", ["fp32", "bf16"], eval_option=True)
    workers: int = arg(default_workers(), "data loader processes (the numbers do not depend on it)", at_least=0,
                       resume_may_differ=True, eval_option=True)
    benchmark: bool = arg(False, "time a training step and evaluation against the bare towers; print JSON",
                          resume_may_differ=True)
    out: str = arg("runs", "folder of run folders", metavar="DIR", resume_may_differ=True)
    class_text: str = arg("", "run on this class-text file instead of the dataset's own (python classtext.py "
                              "write or import makes one); its runs go to a folder of their own", metavar="FILE")


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
    names = {f.name for f in dataclasses.fields(args_cls)}
    parser = OneLineParser(prog=prog, description=description, formatter_class=HelpFormatter,
                           epilog=f"--dataset: {data.benchmarks_line()}" if "dataset" in names else None)
    run_flags, experiment = {f.name for f in dataclasses.fields(RunArgs)}, [f.name for f in dataclasses.fields(ExperimentArgs)]
    order = lambda f: (f.name not in experiment, f.name in run_flags)  # noqa: E731  experiment, the method's, run flags
    for f in sorted(dataclasses.fields(args_cls), key=order):
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


def cli_args(method) -> type:
    """A method module's `Args` with the experiment (`ExperimentArgs`) and the run flags (`RunArgs`)
    added: the dataclass its command line parses into, one class per method (made once)."""
    if "_cli_args" not in vars(method):
        cls = dataclasses.make_dataclass(method.Args.__name__, [], bases=(method.Args, RunArgs, ExperimentArgs))
        cls.__module__, cls.__doc__ = method.__name__, method.Args.__doc__
        method._cli_args = cls
    return method._cli_args


def parse_args(args_cls, argv=None, description: str = "", prog=None):
    """Parse `argv` into `args_cls` (a dataclass, or a method module: its `cli_args`). The names of
    the fields that `argv` gives are kept in the attribute `flags_given` (a set, not a field), so
    that --eval-only can tell `--precision fp32` from no --precision at all."""
    args_cls = cli_args(args_cls) if isinstance(args_cls, types.ModuleType) else args_cls
    absent = object()  # argparse fills in a default only where the namespace has no value yet
    parsed = vars(build_parser(args_cls, description, prog).parse_args(
        argv, argparse.Namespace(**{f.name: absent for f in dataclasses.fields(args_cls)})))
    given = {name: value for name, value in parsed.items() if value is not absent}
    args = args_cls(**given)  # the dataclass's defaults for the rest
    args.flags_given = frozenset(given)
    return args


BOUNDS = {"at_least": (">=", operator.ge), "above": (">", operator.gt), "below": ("<", operator.lt),
          "at_most": ("<=", operator.le)}  # the range keywords of `arg`: their sign and their test


def validate_args(args) -> None:
    """Check every field against the range its `arg` declares, before anything is loaded: whole
    numbers where a bounded int is expected, every real number finite (a NaN would train to
    chance without a word); then the method's own rules between its flags (`Args.check`)."""
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
    if hasattr(args, "check"):
        args.check()


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
            backbone: str = DEFAULT_BACKBONE, class_text: str = "") -> Path:
    """runs/[<backbone>/][text-<hash>/]<method>/<dataset>/<K>shot[_base2novel]/seed<S>/: everything
    that changes the numbers and is not a hyper-parameter is in the path, so a sweep never mistakes
    one run for another (`method` carries a variant, e.g. biomedap-official; text-<hash> keys a
    --class-text FILE by its content, classtext.class_text_folder)."""
    suffix = "_base2novel" if subsample == "base" else ""
    return (Path(out) / backbone_folder(backbone) / classtext.class_text_folder(class_text) / method
            / data.dataset_key(dataset) / f"{shots}shot{suffix}" / f"seed{seed}")


def check_writable(folder, hint: str = "pass --out a folder you can write to") -> None:
    """Refuse in one line, before anything loads, an output folder this process cannot write to
    (read-only, someone else's, a full disk, a file in the way): a file is made and removed in
    `folder`, or in the nearest folder above it that exists (where `folder` will be made)."""
    folder = Path(folder)
    there = next((p for p in (folder, *folder.parents) if p.exists()), Path.cwd())
    if not there.is_dir():
        raise UserError(f"cannot write to {data.printable(folder)}: {data.printable(there)} is a file, not a "
                        f"folder; {hint}")
    try:
        with tempfile.TemporaryFile(dir=there):
            pass
    except OSError as e:
        cause = e.strerror or common.one_line(e)
        raise UserError(f"cannot write to {data.printable(folder)} ({cause[:1].lower()}{cause[1:]}): {hint}") from None


def _drop_lock(lock: FileLock, made: list) -> None:
    """Release a run folder's lock: its file is removed while still held (a process waiting on it
    then locks a new file, as filelock notices), then the folders made for it, when empty."""
    try:
        if not lock.is_locked:  # at exit, filelock's own handler may have released it first
            lock.acquire(timeout=0)
    except Exception:  # noqa: BLE001  another run holds it now (the file is its lock), or the interpreter ends
        return
    try:
        Path(lock.lock_file).unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        lock.release()
    _remove_empty(made)


def _remove_empty(folders: list) -> None:
    """Remove `folders` (outermost first) that are empty, innermost first: a folder that holds
    anything stays."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            pass


class FolderLock:
    """An exclusive lock on a run folder, in a file beside it (`<parent>/.seed<S>.lock`) where every
    process that can reach the folder sees it, whatever its temporary folder (cluster jobs on one
    shared disk). `release()` removes the file and the folders made for it, so a run that fails to
    start leaves nothing behind; a process that ends first releases it too (a killed one through
    the operating system, leaving the file for the next run to take)."""

    def __init__(self, path: Path):
        path = Path(path)
        lock = FileLock(path.with_name(f".{path.name}.lock"))
        made = []  # the folders above the run folder that this lock makes, outermost first
        for attempt in range(3):  # a run that failed to start may remove them meanwhile
            try:
                for folder in reversed([path.parent, *path.parent.parents]):
                    if not folder.exists():
                        folder.mkdir(exist_ok=True)
                        made += [] if folder in made else [folder]
                lock.acquire(timeout=0)
                break
            except Timeout:
                _remove_empty(made)
                raise UserError(f"another run is writing to {data.printable(path)} right now (its lock: "
                                f"{data.printable(lock.lock_file)}): wait for it, or pass --out to write "
                                f"elsewhere") from None
            except OSError as e:
                if isinstance(e, FileNotFoundError) and attempt < 2:
                    continue
                _remove_empty(made)
                raise WriteFailed(lock.lock_file, e) from None
        self.release = weakref.finalize(self, _drop_lock, lock, made)  # at the latest when this object goes


class RunFolder:
    """A run's folder. It appears with the run's first checkpoint, so a run that fails to start
    leaves nothing behind. With --overwrite the new run writes into a sibling staging folder that
    replaces the old run only once the new run has a checkpoint of its own: a restart that fails
    (a backbone that does not load, a missing dataset, a wrong flag) never loses a finished result.
    Locked (`FolderLock`) from here until `close()`, or the end of a `with RunFolder(...)` block."""

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
        self._lock = FolderLock(path)
        self.staging = path.with_name(path.name + ".overwrite") if overwrite and path.exists() else None
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)  # left by a restart that failed: never a result

    def close(self):
        """Release the folder's lock (its file goes, and the folders made for it when still empty)."""
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        except WriteFailed:
            if not self.saved_epoch:  # the folder made for the first checkpoint goes when it is empty
                for folder in [f for f in (self.staging, self.path) if f is not None]:
                    try:
                        folder.rmdir()
                    except OSError:
                        pass
            raise

    saved_epoch = 0  # the epoch of the checkpoint on disk: set by each save, and on resume
    epochs = 0  # the run's last epoch, once it trains: a checkpoint of that epoch ends the training
    phase = "training"  # or "saved" (Ctrl-C held by a checkpoint's write), "evaluation", "results"

    def kept(self) -> str:
        """What a run that stops now leaves behind and how to go on: the end of the line that a
        failed write prints."""
        if self.phase in ("evaluation", "results") or (self.epochs and self.saved_epoch >= self.epochs):
            return (f"the checkpoint of epoch {self.saved_epoch} (the last) is kept in {self.path}; "
                    f"evaluate it with --resume")
        if self.saved_epoch:
            return f"the checkpoint of epoch {self.saved_epoch} is kept in {self.path}; continue with --resume"
        return f"the previous run in {self.path} is kept" if self.staging is not None else "no checkpoint was written"

    @contextmanager
    def stop_on_ctrl_c(self):
        """Around a run from its first epoch to its last line: Ctrl-C, or a write that fails (a full
        disk), becomes one line saying which checkpoint is kept. The results are written under
        `ctrl_c_held`, so an interrupt that comes while they are written ends the run only once they
        are complete; a failed write among them removes metrics.json, so that --resume evaluates
        the last checkpoint again."""
        try:
            yield
        except WriteFailed as e:
            if self.phase == "results":
                (self.path / "metrics.json").unlink(missing_ok=True)
            raise UserError(f"{e}; {self.kept()}") from None
        except KeyboardInterrupt:
            epoch = self.saved_epoch + 1
            trained = self.epochs and self.saved_epoch >= self.epochs  # the last epoch's checkpoint is on disk
            if self.phase == "results":
                message = f"interrupted while the results were written; they were completed first in {self.path}"
            elif trained and self.phase != "evaluation":
                message = (f"interrupted after the last epoch ({self.saved_epoch} of {self.epochs}): the training "
                           f"is finished and its checkpoint is kept in {self.path}; evaluate it with --resume")
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


def run_identity(args) -> dict:
    """The settings that change a run's numbers: every field of `args` whose `arg` does not say
    `resume_may_differ` (the experiment, the method's knobs, the epochs, --precision, ...), with its
    value. The run folder's path keys some of them; a run's record (metrics.json, the checkpoint)
    keeps all of them, and runs are compared on them (`differing_settings`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if not f.metadata.get("resume_may_differ")}


def _as_recorded(value):
    return json.loads(json.dumps(value, default=str))  # as metrics.json keeps it: lists, not tuples


def setting_text(value) -> str:
    """A setting's value as the command line spells it: none, 5, 0.0025, 5 8 (a list)."""
    if value is None or value == []:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def differing_settings(recorded: dict, args) -> list:
    """The settings of `run_identity(args)` on which `args` differ from a run's `recorded`
    arguments, each as "--flag recorded -> asked". A setting the record lacks (the flag came after
    the run) counts as its default, which is how the run behaved."""
    changed = []
    for f in dataclasses.fields(args):
        if f.metadata.get("resume_may_differ"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        was, now = _as_recorded(recorded.get(f.name, default)), _as_recorded(getattr(args, f.name))
        if was != now:
            changed.append(f"--{f.name.replace('_', '-')} {setting_text(was)} -> {setting_text(now)}")
    return changed


def finished_run_differs(folder, args) -> list:
    """`differing_settings` between `args` and the finished run in `folder` (its metrics.json);
    [] when they agree, or when the folder holds no readable record of its arguments."""
    try:
        recorded = json.loads((Path(folder) / "metrics.json").read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return differing_settings(recorded, args) if isinstance(recorded, dict) else []


def check_resume(saved_args: dict, args) -> None:
    """Refuse to resume with a setting that changes the numbers: every field whose `arg` does not
    say `resume_may_differ` (precision included)."""
    changed = differing_settings(saved_args, args)
    if changed:
        raise UserError(f"--resume with different settings ({', '.join(changed)}) than the checkpoint; "
                        f"use the run's settings or --overwrite")


def start_run(args, folder_of):
    """What a training run checks before anything is loaded: the shared arguments, the device and
    precision, the run folder `folder_of(args)` (never clobbered; a finished run made with other
    settings is named as such; it must be writable, and is locked), and with --resume the
    checkpoint and its settings. A folder dataset and a --class-text file are recorded by their
    absolute paths. Returns (args,
    device, RunFolder, checkpoint or None): close the RunFolder when the run ends."""
    args = dataclasses.replace(args, dataset=data.dataset_arg(args.dataset),
                               class_text=str(Path(args.class_text).resolve()) if args.class_text else "")
    data.check_out_folder(args.dataset, args.out)
    folder = folder_of(args)
    validate_args(args)
    if getattr(args, "predictions", ""):
        raise UserError("--predictions names the CSV of --predict RUN_DIR IMAGES...: give --predict too")
    device = resolve_device(args.device)
    autocast(args.precision, device)  # refuses bf16 without CUDA
    changed = [] if args.overwrite else finished_run_differs(folder, args)
    if changed:
        raise UserError(f"{data.printable(folder)} holds a finished run made with other settings "
                        f"({', '.join(changed)}): pass --overwrite to replace it, or --out to write elsewhere")
    check_writable(folder)
    run = RunFolder(folder, args.overwrite, args.resume)
    try:
        return args, device, run, resume_checkpoint(run, args) if args.resume else None
    except BaseException:
        run.close()
        raise


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
    """(checkpoint, arguments to evaluate with, the evaluation options this command line gave).
    An option parsed from a command line counts when it is named there, even at its default value
    (`--precision fp32` on a bf16 run); for arguments built in Python (no `flags_given`), when it
    differs from its default."""
    validate_args(cli)
    ckpt, args = load_finished_run(cli.eval_only, args_cls)
    keyed = [part for part in Path(cli.eval_only).resolve().parts if part.startswith("text-")]
    if args.class_text and keyed and classtext.class_text_folder(args.class_text) != keyed[-1]:
        raise UserError(f"the class text {args.class_text} has changed since {cli.eval_only} was trained (its folder "
                        f"is {keyed[-1]}): put the run's text back, or train a run on the new text")
    named, defaults = getattr(cli, "flags_given", None), args_cls()
    given = {f.name: getattr(cli, f.name) for f in dataclasses.fields(cli) if f.metadata.get("eval_option") and (
        f.name in named if named is not None else getattr(cli, f.name) != getattr(defaults, f.name))}
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
    """Write `text` to a temporary file beside `path`, then rename; WriteFailed (one line) when
    the disk is full or the folder cannot be written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    except OSError as e:
        raise WriteFailed(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: no .tmp is left behind


def atomic_write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def save_checkpoint(path: Path, state: dict):
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint, and a
    write that fails (a full disk) leaves the previous checkpoint as it was and raises WriteFailed.
    `state` holds tensors, numbers, strings, lists and dicts only (weights_only loadable)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # through a Python file, a full disk is an OSError naming its cause
            torch.save(state, f)
        os.replace(tmp, path)
    except OSError as e:
        raise WriteFailed(path, e) from None
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
    """metrics.json (with a method's run, its `run_identity` too), and confusion.png beside it (one
    panel per block of `metrics` that has a confusion matrix). `classnames` labels the axes: a list
    for every block of that many classes, or {block: list} (base-to-novel: base and novel classes
    differ)."""
    record = {"args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args),
              "metrics": metrics, "timings": timings, "versions": library_versions(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}
    if record["args"].get("class_text"):  # read instead of the dataset's own text (the content: in the checkpoint)
        path = Path(record["args"]["class_text"])
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        record["class_text_file"] = {"path": str(path.resolve()), "sha256": digest}
    if isinstance(args, RunArgs):  # a method's run: what summaries group its seeds by
        record["identity"] = run_identity(args)
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
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except OSError as e:
        raise WriteFailed(path, e) from None
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


# --------------------------------------------------------------------------- a method's run
# What both methods did alike around their training, once, driven by the method module. A method
# module (biomedap.py, biomedvr.py) provides, besides its model: `Args`; `NAME`; `run_name(args)`;
# `configure(args, backbone, class_text)` (the resolved config, with "epochs"); `transforms_for(args,
# backbone)` (train, test); `loader_settings(cfg, args)`; `build(backbone, classnames, class_text,
# cfg, args, support=None)`; `make_optimizer_for(model, cfg, args, steps_per_epoch)`;
# `train_epoch(...)`; `evaluate_run(...)`; `benchmark_parts(...)`; and, optional (`hook`),
# `after_epoch(...)`, `final_metrics(...)`, `pictures(...)`, `prediction_extras(out, classnames)`.
# Its `Args` may define `check()`, the rules between its flags (`validate_args` calls it).
OPTIONAL_HOOKS = {  # what a method without one of these gets
    "after_epoch": lambda *a: ("", None),             # nothing added to the epoch line, no record
    "final_metrics": lambda metrics, *a: metrics,     # the metrics as evaluated
    "pictures": lambda *a: {},                        # confusion.png only
    "prediction_extras": lambda *a: {}}               # nothing but the class probabilities


def hook(method, name):
    """The method module's optional hook `name`, or what OPTIONAL_HOOKS gives in its place."""
    return getattr(method, name, None) or OPTIONAL_HOOKS[name]


@dataclasses.dataclass
class Setup:
    """What a run of a method works on: the frozen backbone, the model, the training classes'
    few-shot splits, the evaluation blocks {"test"} or {"base", "novel"}, the class text, the
    resolved configuration, and the method's (train, test) transforms."""
    backbone: object
    model: torch.nn.Module
    train: data.Splits
    evals: dict
    text: dict
    cfg: dict
    transforms: tuple


def make_loaders(method, items, transform, cfg, args, train: bool):
    """The method's loader over `items` (data.ImageDataset): shuffled and augmented for training,
    in order for evaluation, with the batch sizes the method resolved."""
    sizes = method.loader_settings(cfg, args)
    size = sizes["batch_size"] if train else sizes["test_batch_size"]
    return data.make_loader(data.ImageDataset(items, transform), size, train, args.seed, args.workers,
                            drop_last=sizes["drop_last"])


def setup(method, args, device, training: bool = True) -> Setup:
    """Backbone, data, class text, config and model of a run of `method`. For training, the
    model is built with `support` (the training images under the test transform, e.g. for
    BiomedAP's prototypes); for evaluation without it."""
    backbone = common.load_backbone(args.backbone, device)
    train_tf, test_tf = method.transforms_for(args, backbone)
    full = data.load_splits(args.dataset, args.root, args.download, image_size=method.input_size(args, backbone),
                            show=True)
    train = data.subsample_classes(data.few_shot_splits(full, args.shots, args.seed), args.subsample)
    evals = {"test": train} if args.subsample == "all" else {"base": train,
                                                             "novel": data.subsample_classes(full, "novel")}
    everyone = [name for split in evals.values() for name in split.classnames]  # base and novel alike
    text = class_text(args, backbone, everyone, method.NAME)
    cfg = method.configure(args, backbone, text)
    support = None
    if training:
        sizes = method.loader_settings(cfg, args)
        support = data.make_loader(data.ImageDataset(train.train, test_tf), sizes["test_batch_size"], False,
                                   args.seed, 0)
    model = method.build(backbone, train.classnames, text, cfg, args, support).to(device)
    return Setup(backbone, model, train, evals, text, cfg, (train_tf, test_tf))


def run_folder(method, args) -> Path:
    """runs/[<backbone>/][text-<hash>/]<method run name>/<dataset>/<K>shot[_base2novel]/seed<S>/"""
    return run_dir(args.out, method.run_name(args), args.dataset, args.shots, args.seed, args.subsample,
                   args.backbone, args.class_text)


def classnames_of(evals) -> dict:
    """Class names per evaluation block, for the axes of confusion.png."""
    return {name: split.classnames for name, split in evals.items()}


def train(method, args):
    """A training run of `method` from the command line: the run folder, the epochs with a
    checkpoint after each (and --resume), evaluation, metrics.json and the pictures."""
    start = time.perf_counter()
    args, device, run, ckpt = start_run(args, lambda a: run_folder(method, a))
    with run:  # its lock is released however the run ends
        common.seed_everything(args.seed)
        s = setup(method, args, device)
        model, cfg = s.model, s.cfg
        loader = make_loaders(method, s.train.train, s.transforms[0], cfg, args, train=True)
        optimizer, scheduler = method.make_optimizer_for(model, cfg, args, len(loader))
        print(describe_trainable(model, group=method.TRAINABLE_GROUPS), f"{len(s.train.train)} training images,",
              f"{len(s.train.classnames)} classes, {len(loader)} steps/epoch; config {cfg}")
        first = restore_training_state(ckpt, model, optimizer, scheduler) if ckpt else 1
        history = ckpt["history"] if ckpt else []  # a method's per-epoch records (BioMedVR's --eval-every)
        class_text = dict(s.text, classes={c: s.text["classes"][c] for c in s.train.classnames})  # for --predict
        first_eval = s.evals[next(iter(s.evals))].test
        test_loader = make_loaders(method, first_eval, s.transforms[1], cfg, args, train=False)
        setup_s, train_start = time.perf_counter() - start, time.perf_counter()
        epochs = run.epochs = cfg["epochs"]
        last = min(args.stop_after_epoch or epochs, epochs)
        with run.stop_on_ctrl_c():
            for epoch in range(first, last + 1):
                epoch_start = time.perf_counter()
                loader.sampler.set_epoch(epoch)  # the order and augmentations of this epoch
                stats = method.train_epoch(model, loader, optimizer, scheduler, cfg, args, device)
                extra, record = hook(method, "after_epoch")(model, epoch, cfg, args, device, test_loader)
                if record is not None:
                    history.append(record)
                check_finite(stats, epoch)
                run.save_checkpoint(training_state(model, args, epoch, optimizer, scheduler, class_text, history))
                print(epoch_line(epoch, epochs, stats, time.perf_counter() - epoch_start, extra), flush=True)
            if last < epochs:
                print(f"stopped after epoch {last} (--stop-after-epoch); continue with --resume")
                return None
            run.phase = "evaluation"
            train_s, eval_start = time.perf_counter() - train_start, time.perf_counter()
            metrics = evaluate_setup(method, s, args, device)
            metrics = hook(method, "final_metrics")(metrics, history, cfg, args)
            timings = {"setup_s": setup_s, "train_s": train_s, "eval_s": time.perf_counter() - eval_start}
            run.phase = "results"
            with ctrl_c_held():  # metrics.json, the pictures and the finished checkpoint, all or none
                extra = {"config": cfg, "trainable_parameters": sum(p.numel() for p in model.parameters()
                                                                    if p.requires_grad),
                         **data.data_record(s.train)}
                if history:
                    extra["eval_history"] = history
                write_metrics(run.path, args, metrics, timings, extra, classnames_of(s.evals))
                for name, figure in hook(method, "pictures")(model, lambda: examples(s), cfg, args, new_figure).items():
                    atomic_write_png(figure, run.path / name)
                finish_checkpoint(run.path)
                print(summary_line(metrics), f"-> {run.path / 'metrics.json'}", flush=True)
        return metrics


def examples(s: Setup, n: int = 4):
    """A few training images, one per class (the first of each), under the test transform, and
    their class names: what a method's pictures show."""
    firsts = list({item.label: item for item in reversed(s.train.train)}.values())[::-1][:n]
    dataset = data.ImageDataset(firsts, s.transforms[1])
    return torch.stack([dataset[i][0] for i in range(len(firsts))]), [item.classname for item in firsts]


def evaluate_setup(method, s: Setup, args, device) -> dict:
    """The method's metrics of every evaluation block, with the perturbed prompts of --robustness
    when the method has that flag and it is on."""
    loaders = {name: make_loaders(method, split.test, s.transforms[1], s.cfg, args, train=False)
               for name, split in s.evals.items()}
    perturbed = classtext.perturbed_sentences(s.text, s.train.classnames) if getattr(args, "robustness", False) else None
    return method.evaluate_run(s.model, s.backbone, s.evals, loaders, s.text, s.cfg, args, device, perturbed)


def eval_only(method, cli):
    """--eval-only RUN_DIR: evaluate a finished run with its saved arguments (evaluation options
    given on this command line win) and rewrite its metrics.json."""
    check_writable(cli.eval_only, "--eval-only rewrites the run's metrics.json: copy the run folder somewhere "
                                  "you can write to")
    ckpt, args, given = eval_only_args(cli, cli_args(method))
    device = resolve_device(args.device)
    common.seed_everything(args.seed)
    s = setup(method, args, device, training=False)
    if ckpt["epoch"] < s.cfg["epochs"]:
        raise UserError(f"{cli.eval_only} is unfinished (epoch {ckpt['epoch']} of {s.cfg['epochs']}): "
                        f"finish it with --resume")
    load_trainable(s.model, ckpt["trainable"])
    start = time.perf_counter()
    metrics = evaluate_setup(method, s, args, device)
    write_eval_only(cli.eval_only, args, metrics, time.perf_counter() - start, given,
                    {"config": s.cfg, **data.data_record(s.train)}, classnames_of(s.evals))
    print(summary_line(metrics), f"-> {cli.eval_only}/metrics.json")
    return metrics


def load_run(method, run_dir, device="cpu", backbone=None) -> "Predictor":
    """A finished run of `method` as a `Predictor` (`load_run(biomedap, RUN_DIR)(images)`: class
    probabilities, plus the method's extras). Needs the run folder and the backbone only: the
    class names and class text are the run's own (its dataset may have moved or changed)."""
    ckpt, args = load_finished_run(run_dir, cli_args(method))
    classnames, text = ckpt["classnames"], ckpt["class_text"]
    backbone = backbone or common.load_backbone(args.backbone, device)
    cfg = method.configure(args, backbone, text)
    if ckpt["epoch"] < cfg["epochs"]:
        raise UserError(f"{run_dir} is unfinished (epoch {ckpt['epoch']} of {cfg['epochs']}): finish it with --resume")
    model = method.build(backbone, classnames, text, cfg, args).to(device)
    load_trainable(model, ckpt["trainable"])
    return Predictor(model, method.transforms_for(args, backbone)[1], classnames, device,
                     hook(method, "prediction_extras"))


def benchmark(method, args) -> dict:
    """--benchmark: a training step and inference of `method` against the bare frozen towers
    (see `benchmark_report`), under --precision, on random inputs."""
    validate_args(args)
    device = resolve_device(args.device)
    autocast(args.precision, device)  # refuses bf16 without CUDA before anything is loaded
    common.seed_everything(args.seed)
    backbone = common.load_backbone(args.backbone, device)
    parts = method.benchmark_parts(args, backbone, device, data.synthetic_class_text())
    return benchmark_report(device, args.precision, **parts)


def run(method, args):
    """What the command line of `method` does with parsed `args` (from `cli_args(method)`): the
    benchmark, --eval-only, --predict, or a training run."""
    if args.benchmark:
        return benchmark(method, args)
    if args.eval_only:
        return eval_only(method, args)
    if args.predict:
        return predict_cli(args, lambda run_dir, device: load_run(method, run_dir, device))
    return train(method, args)


def run_method(method, argv=None):
    """A method module's command line: `run_cli` around `run`, with its --help from the module's
    first docstring paragraph."""
    return run_cli(lambda args: run(method, args), cli_args(method), method.__doc__.split("\n\n")[0], argv)


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
    the method's extras), written by `write_predictions`. An existing CSV is replaced only with
    --overwrite, and its folder must be writable: both are checked before the run loads."""
    validate_args(args)
    target, overwrite = Path(args.predictions) if args.predictions else None, getattr(args, "overwrite", False)
    if target is not None and target.is_dir():
        raise UserError(f"--predictions {args.predictions} is a folder: give a file name, e.g. predictions.csv")
    if target is not None and target.exists() and not overwrite:
        raise UserError(f"{data.printable(target)} exists: pass --overwrite to replace it, or another "
                        f"--predictions file")
    if target is not None:
        check_writable(target.parent, "pass --predictions a file in a folder you can write to")
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
    if target is not None:
        write_predictions(target, rows, overwrite)
        print(f"{len(rows)} predictions -> {data.printable(target)}")
    return rows


def write_predictions(target: Path, rows: list, overwrite: bool = False):
    """The CSV of --predictions (a header from the first row's keys, then the rows), safe beside
    other --predict runs writing the same file: under a lock beside it (`.<name>.lock`, removed
    afterwards), into a temporary file of this process's own, renamed into place. A file that
    another run wrote since this one started is replaced only with `overwrite` (else UserError);
    a failed write is WriteFailed and leaves the old file as it was."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteFailed(target, e) from None
    lock_file = target.with_name(f".{target.name}.lock")
    lock = FileLock(lock_file)
    try:
        lock.acquire()  # the other writer holds it for milliseconds
    except OSError as e:
        raise WriteFailed(lock_file, e) from None
    try:
        if target.exists() and not overwrite:
            raise UserError(f"{data.printable(target)} was written by another run while this one predicted: "
                            f"pass --overwrite to replace it, or another --predictions file")
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x", newline="", encoding="utf-8") as f:  # "x": a name no one else has
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, target)
        except OSError as e:
            raise WriteFailed(target, e) from None
        finally:
            tmp.unlink(missing_ok=True)  # after a failure: no temporary file is left behind
    finally:
        lock_file.unlink(missing_ok=True)  # while held, as data.download_dataset does
        lock.release()


# --------------------------------------------------------------------------- class text, a sweep's questions
def class_text(args, backbone, classnames, method: str) -> dict:
    """The class text a run of `method` reads (--class-text FILE, else its dataset's own), checked
    for what the method reads of it and tokenised as `backbone`'s text tower will (classtext.py)."""
    text = classtext.load_class_text(args.dataset, classnames, args.root, method,
                                     path=getattr(args, "class_text", "") or None)
    classtext.check_text_fits(backbone, text, classnames, classtext.CLASS_TEXT_ENCODES[method])
    return text


def check_setup(args) -> None:
    """`--check-setup DATASET...`: what a sweep needs, checked once before its first job: these
    flags are valid, the backbone loads, and every dataset is there (downloaded once with
    --download), its images open and its class text covers its classes (`needs`: the fields of
    the class text this command uses)."""
    validate_args(args)
    backbone = common.load_backbone(args.backbone, "cpu")
    method = script_of(type(args))[:-3]  # the class text each command reads: classtext.CLASS_TEXT_ENCODES
    for name in args.check_setup:
        splits = data.load_splits(name, args.root, args.download)
        class_text(dataclasses.replace(args, dataset=name), backbone, splits.classnames, method)
    print(f"setup ok: backbone {args.backbone}, datasets {' '.join(args.check_setup)}", file=sys.stderr)


def finished_runs(method, jobs) -> list:
    """What a sweep (run.sh) asks before it skips a job whose folder holds a finished run: for each
    job (a list of `method`'s command-line arguments) "none" (its folder holds no finished run),
    "same" (one made with these settings, or one without a record to compare with) or "differs:"
    and the differing settings ("--epochs 100 -> 5, ..."), each answer one line."""
    answers = []
    for argv in jobs:
        args = parse_args(method, argv)
        args = dataclasses.replace(args, dataset=data.dataset_arg(args.dataset))
        folder = run_folder(method, args)
        if not (folder / "metrics.json").is_file():
            answers.append("none")
            continue
        changed = finished_run_differs(folder, args)
        answers.append("differs: " + ", ".join(changed).replace("\n", "\\n") if changed else "same")
    return answers


def finished_runs_cli(method, stream=None) -> None:
    """`python -c 'import runner, biomedap; runner.finished_runs_cli(biomedap)'`: `finished_runs` for
    the jobs on standard input (bytes), each written as its number of arguments and then its
    arguments, every item ended by a NUL byte (any path passes); prints one answer a line. A bad flag or
    dataset is one line and exit 2."""
    items = [os.fsdecode(item) for item in (stream or sys.stdin.buffer).read().split(b"\0")[:-1]]
    jobs = []
    while items:
        count, items = int(items[0]), items[1:]
        jobs.append(items[:count])
        items = items[count:]
    try:
        print("\n".join(finished_runs(method, jobs)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
