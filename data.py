"""Datasets for the BiomedCoOp few-shot benchmark, your own image folders, and a synthetic set.

A dataset is named on the command line as one of three things:
  * a benchmark name (`btmri`, `busi`, ...): `<root>/<DIR>/split_<DIR>.json` with the images under
    `<root>/<DIR>/<DIR>/`, fetched from huggingface.co/datasets/TahaKoleilat/BiomedCoOp by `--download`;
  * a path to your own folder with one sub-folder per class (and optionally `split.json`, `prompts.json`);
  * `synthetic`: four classes of generated shapes, made in memory, for smoke runs and tests.

The few-shot subsets and base/novel classes follow the official pipeline (Dassl's
`generate_fewshot_dataset` and the `subsample_classes` of each BiomedCoOp dataset), so the same
split file and seed give the same images as the papers.
"""

import colorsys
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import stat
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from tqdm import tqdm

from common import UserError

# ---------------------------------------------------------------- registry

DATASETS = {  # CLI name -> folder name (Dassl's DATASET.NAME)
    "btmri": "BTMRI", "busi": "BUSI", "chmnist": "CHMNIST", "covid": "COVID_19",
    "ctkidney": "CTKidney", "dermamnist": "DermaMNIST", "kneexray": "KneeXray",
    "kvasir": "Kvasir", "lungcolon": "LungColon", "octmnist": "OCTMNIST", "retina": "RETINA",
}

# Label order of the official split files. The loader always reads names and order from the split
# file itself; this table is what prompts/*.json are checked against.
CLASSNAMES = {
    "btmri": ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"],
    "busi": ["benign tumor", "malignant tumor", "normal scan"],
    "chmnist": ["adipose tissue", "complex stroma", "debris", "empty background", "immune cells",
                "normal mucosal glands", "simple stroma", "tumour epithelium"],
    "covid": ["covid lungs", "lung opacity lungs", "viral pneumonia lungs", "normal lungs"],
    "ctkidney": ["cyst kidney", "kidney stone", "kidney tumor", "normal kidney"],
    "dermamnist": ["actinic keratosis", "basal cell carcinoma", "benign keratosis", "dermatofibroma",
                   "melanoma", "melanocytic nevus", "vascular lesion"],
    "kneexray": ["healthy knee", "doubtful osteoarthritis", "minimal osteoarthritis",
                 "moderate osteoarthritis", "severe osteoarthritis"],
    "kvasir": ["dyed lifted polyps", "dyed resection margins", "esophagitis", "normal cecum",
               "normal pylorus", "normal z line", "polyps", "ulcerative colitis"],
    "lungcolon": ["colon adenocarcinoma", "colon benign tissue", "lung adenocarcinoma",
                  "lung benign tissue", "lung squamous cell carcinoma"],
    # MedMNIST order; not confirmed against the official split file, which was not available.
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal OCT scan"],
    "retina": ["diabetic retinopathy", "glaucoma", "cataract", "normal retina"],
}

HF_REPO = "TahaKoleilat/BiomedCoOp"
MAX_EXTRACT_BYTES = 50 * 10**9
SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"}
PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class Item:
    path: str  # absolute file path, or "synthetic:<split>:<index>:<size>"
    label: int
    classname: str


@dataclass
class Splits:
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]  # index = label
    name: str  # CLI name, or the folder's name for your own data


# ---------------------------------------------------------------- split files

def read_split_file(path, image_dir=None) -> dict[str, list[Item]]:
    """Read `{"train"|"val"|"test": [[relative_path, label, "class name"], ...]}`.

    Paths are relative to `image_dir`: by default `<DIR>/` beside an official `split_<DIR>.json`,
    otherwise the split file's own folder (your own `split.json`).
    """
    path = Path(path)
    if image_dir is None:
        official = path.name == f"split_{path.parent.name}.json"
        image_dir = path.parent / path.parent.name if official else path.parent
    image_dir = Path(image_dir)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read split file {path}: {error.strerror or error}") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"split file {path} is not valid JSON: {error}") from None

    def wrong(problem):
        return UserError(f"split file {path} has the wrong format: {problem} (expected "
                         '{"train"|"val"|"test": [[relative_path, label, "class name"], ...]})')

    if not isinstance(content, dict) or not all(isinstance(content.get(s), list) for s in SPLIT_NAMES):
        raise wrong('it needs the keys "train", "val" and "test", each a list')
    parts, names = {}, {}  # names: label -> class name, over all three splits
    for split in SPLIT_NAMES:
        parts[split] = []
        for index, entry in enumerate(content[split]):
            ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                  and type(entry[1]) is int and entry[1] >= 0 and isinstance(entry[2], str) and entry[2])
            if not ok:
                raise wrong(f'"{split}" entry {index} is {json.dumps(entry)[:120]}')
            relative, label, classname = entry
            if names.setdefault(label, classname) != classname:
                raise wrong(f'label {label} is called both "{names[label]}" and "{classname}"')
            parts[split].append(Item(os.path.abspath(image_dir / relative), label, classname))
    if not parts["train"] or not parts["test"]:
        raise wrong('"train" and "test" must not be empty')
    if sorted(names) != list(range(len(names))) or len(set(names.values())) != len(names):
        raise wrong(f"labels must be 0..n-1 with one distinct name each, found {dict(sorted(names.items()))}")
    return parts


def _classnames(items) -> list[str]:
    names = {item.label: item.classname for item in items}
    return [names[label] for label in sorted(names)]


def _check_images_exist(parts, source):
    # Checked once up front: a missing test image would otherwise surface only after training.
    missing = [item.path for items in parts.values() for item in items if not os.path.isfile(item.path)]
    if missing:
        raise UserError(f"{len(missing)} image file(s) listed in {source} do not exist, the first is "
                        f"{missing[0]}; fix the split file or the image folder")


def image_problem(path: str, decoded: dict | None = None) -> str | None:
    """Why `path` would not open as an image, or None; far cheaper than decoding every pixel.

    PNG: every chunk's checksum (catches truncation and corruption). JPEG: a decode at 1/8
    scale (reads the whole stream). DICOM: the header, and pixel data of the declared size when
    uncompressed; compressed, one file per kind of compression is decoded, remembered in `decoded`.
    Others: a full decode.
    """
    if not os.path.isfile(path):
        return "the file does not exist"
    try:
        if Path(path).suffix.lower() == ".dcm":
            return _dicom_problem(path, {} if decoded is None else decoded)
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("L", (1, 1))  # the smallest DCT scale: still every byte, an 8th of the work
                image.load()
    except Exception as error:  # any of them would stop training later; report it now
        return f"{type(error).__name__}: {error}"
    return None


def _dicom_problem(path, decoded):
    import pydicom  # only needed for .dcm files

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        return "it has no pixel data"
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        # A decoder reads all files of one compression and bit depth, or none of them.
        kind = (str(syntax), ds.get("BitsStored"), ds.get("SamplesPerPixel"))
        if kind not in decoded:
            try:
                open_dicom(path)
                decoded[kind] = None
            except UserError as error:
                decoded[kind] = str(error)
        return decoded[kind]
    frames = int(ds.get("NumberOfFrames") or 1)
    size = math.ceil(ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * frames * ds.BitsAllocated / 8)
    if len(ds.PixelData) < size:
        return f"its pixel data is truncated ({len(ds.PixelData)} of {size} bytes)"
    return None


def check_images_open(items, source) -> None:
    """Raise UserError naming how many images of `items` would not open, the first and why.

    Run before training so that an unreadable test image fails in seconds, not after hours.
    """
    paths = [item.path for item in items if not item.path.startswith("synthetic:")]
    decoded = {}
    # Threads: the decoders release the GIL, and on network storage the reads overlap.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        problems = list(tqdm(pool.map(lambda path: image_problem(path, decoded), paths), total=len(paths),
                             desc="checking images", leave=False, disable=len(paths) < 5000))
    failed = [(path, why) for path, why in zip(paths, problems) if why]
    if failed:
        path, why = failed[0]
        raise UserError(f"{len(failed)} of {len(paths)} image file(s) of {source} cannot be opened, the first "
                        f"is {path}: {why}; fix or remove them before training")


# ---------------------------------------------------------------- loading a dataset

def dataset_arg(dataset: str) -> str:
    """The --dataset value a run records: a benchmark's registry name, or a folder's absolute path
    (so evaluation and prediction later find the same folder from anywhere)."""
    dataset = str(dataset)
    if dataset.lower() == "synthetic" or dataset.lower() in DATASETS:
        return dataset.lower()
    return str(Path(dataset).resolve()) if Path(dataset).is_dir() else dataset


def dataset_key(dataset: str) -> str:
    """The one name of a dataset, for run folders and summaries.

    A benchmark in any case (`BUSI`, `Busi`) gives its registry name (`busi`), `synthetic` gives
    itself, and a folder its own name after resolving (`.` and `./mine/` give the folder's name).
    """
    dataset = str(dataset)
    if dataset.lower() == "synthetic" or dataset.lower() in DATASETS:
        return dataset.lower()
    name = Path(dataset).resolve().name
    if not name:
        raise UserError(f"dataset folder {dataset} has no name (the file system root): use a sub-folder")
    return name


def load_splits(dataset: str, root: str = "data", download: bool = False, split_seed: int = 0,
                image_size: int = 224) -> Splits:
    """The full train/val/test splits of a benchmark name, your own folder, or `synthetic`.

    `split_seed` only shapes the split of your own folder when it has no split.json: it is not
    the run's seed, so runs with different seeds share one test set; `image_size` only the
    synthetic images.
    """
    dataset = str(dataset)
    if dataset.lower() == "synthetic":
        return _synthetic_splits(image_size)
    if dataset.lower() in DATASETS:
        return _benchmark_splits(dataset.lower(), Path(root), download)
    if Path(dataset).is_dir():
        return _folder_splits(Path(dataset), split_seed)
    if "/" in dataset or os.sep in dataset or dataset.startswith("."):
        raise UserError(f"dataset folder {dataset} does not exist")
    raise UserError(f"unknown dataset '{dataset}': use one of {', '.join(DATASETS)}, synthetic, "
                    "or the path to your own folder with one sub-folder per class")


def _benchmark_splits(name, root, download):
    folder = root / DATASETS[name]
    split_path = folder / f"split_{folder.name}.json"
    if not split_path.is_file():
        if not download:
            raise UserError(
                f"dataset {name} not found: expected {split_path} with the images under "
                f"{folder / folder.name}/<class>/; add --download to fetch it from "
                f"huggingface.co/datasets/{HF_REPO}, or unzip {folder.name}.zip there by hand")
        download_dataset(name, root)
    parts = read_split_file(split_path)
    splits = Splits(**parts, classnames=_classnames(sum(parts.values(), [])), name=name)
    check_every_class_trains(splits, split_path)
    check_images_open(sum(parts.values(), []), split_path)
    return splits


def _folder_splits(folder, seed):
    split_path = folder / "split.json"
    if split_path.is_file():
        source, parts = split_path, read_split_file(split_path, image_dir=folder)
    else:
        source, parts = folder, _stratified_split(folder, seed)
    splits = Splits(**parts, classnames=_classnames(sum(parts.values(), [])), name=dataset_key(str(folder)))
    if len(splits.classnames) < 2:
        raise UserError(f"{source} has {len(splits.classnames)} class ({', '.join(splits.classnames)}): "
                        f"classification needs at least 2 classes, each in its own sub-folder")
    check_every_class_trains(splits, source)
    check_images_open(sum(parts.values(), []), source)
    return splits


def check_every_class_trains(splits: Splits, source) -> None:
    """A class with no training image would get a zero prototype and an untrained prompt: refuse it."""
    trained = {item.label for item in splits.train}
    empty = [name for label, name in enumerate(splits.classnames) if label not in trained]
    if empty:
        raise UserError(f"class(es) {', '.join(repr(n) for n in empty)} of {source} have no training image; "
                        "every class needs at least one: add training images or drop the class")


def _stratified_split(folder, seed):
    """60/20/20 per class (at least one test image each), seeded; classes in folder-name order."""
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
    if not class_dirs:
        raise UserError(f"{folder} has no class sub-folders: put each class's images in "
                        f"{folder}/<class_name>/ (underscores become spaces), or add a split.json")
    owners = {}  # class name -> the folder that gives it
    for class_dir in class_dirs:
        other = owners.setdefault(class_dir.name.replace("_", " "), class_dir)
        if other != class_dir:
            raise UserError(f"class folders {other} and {class_dir} both give the class name "
                            f"'{class_dir.name.replace('_', ' ')}' (underscores become spaces): "
                            "merge or rename one")
    rng = random.Random(seed)
    parts = {split: [] for split in SPLIT_NAMES}
    skipped = []  # files in class folders that are not images; hidden files are left out silently
    for label, class_dir in enumerate(class_dirs):
        files = [p for p in class_dir.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)]
        skipped += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        # Sorted before shuffling so the split does not depend on the file system's listing order.
        images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(images) < 2:
            raise UserError(f"class folder {class_dir} has {len(images)} image(s); each class needs "
                            "at least 2, one to train on and one to test on")
        rng.shuffle(images)
        n_test, n_val = max(1, len(images) // 5), len(images) // 5
        cuts = {"test": images[:n_test], "val": images[n_test:n_test + n_val],
                "train": images[n_test + n_val:]}
        for split, paths in cuts.items():
            parts[split] += [Item(str(p.absolute()), label, class_dir.name.replace("_", " ")) for p in paths]
    if skipped:
        names = ", ".join(str(p.relative_to(folder)) for p in sorted(skipped)[:3])
        print(f"warning: skipping {len(skipped)} file(s) in the class folders of {folder} that are not images "
              f"({' '.join(sorted(IMAGE_EXTENSIONS))}): {names}{', ...' if len(skipped) > 3 else ''}",
              file=sys.stderr)
    return parts


# ---------------------------------------------------------------- download

def download_dataset(name: str, root) -> Path:
    """Fetch `<DIR>.zip` from the Hugging Face hub and unpack it as `<root>/<DIR>`; returns that folder.

    Processes that start it at once (the seeds of a sweep) take turns on `<root>/.<DIR>.lock`:
    the first downloads, the others wait and then find the dataset in place. The lock file is
    removed when the download ends, whether it succeeded or failed.
    """
    import filelock  # a dependency of huggingface_hub; slow to import, only needed here

    Path(root).mkdir(parents=True, exist_ok=True)
    # Held over the check, the download and the rename, so no process ever sees another's
    # half-made target or renames onto it. The file is removed while the lock is held: filelock
    # notices when the file it locked was removed meanwhile and locks the new one instead.
    path = Path(root) / f".{DATASETS[name]}.lock"
    with filelock.FileLock(path):
        try:
            return _download_locked(name, root)
        finally:
            with contextlib.suppress(OSError):  # Windows removes it itself, once released
                path.unlink()


def _download_locked(name, root):
    folder = DATASETS[name]
    target, split_name = Path(root) / folder, f"split_{folder}.json"
    by_hand = (f"download {folder}.zip from huggingface.co/datasets/{HF_REPO} by hand and unzip it so "
               f"that {target / split_name} and the images under {target / folder}/ exist")
    if (target / split_name).is_file():
        return target  # another process finished it while we waited for the lock
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists but has no {split_name}: move it away or complete it by hand, "
                        "then run again")
    import huggingface_hub  # only needed here; it is slow to import
    try:
        zip_path = huggingface_hub.hf_hub_download(repo_id=HF_REPO, repo_type="dataset",
                                                   filename=f"{folder}.zip")
    except Exception as error:  # offline mode, DNS, HTTP: the hub raises many types that all mean this
        raise UserError(f"could not reach the Hugging Face hub ({type(error).__name__}); {by_hand}") from None

    # Unpack beside the target and rename only when complete, so an interrupted or refused
    # download never leaves a half dataset that would later look installed.
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}-download-"))
    try:
        safe_extract(zip_path, scratch)
        # The zip may hold `<DIR>/...` or the content directly: the split file marks the top.
        found = sorted(scratch.rglob(split_name), key=lambda p: len(p.parts))
        if not found:
            raise UserError(f"{zip_path} has no {split_name} (it is in the BiomedCoOp repository under "
                            f"data/{folder}/); {by_hand}")
        content = found[0].parent
        parts = read_split_file(found[0], image_dir=content / folder)
        _check_images_exist(parts, f"{split_name} of {zip_path}")
        if target.exists():
            target.rmdir()  # empty, checked above
        content.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def safe_extract(zip_path, target_dir, max_bytes: int = MAX_EXTRACT_BYTES) -> None:
    """Extract a zip after checking every entry; nothing is written if any entry is refused."""
    target = Path(target_dir).resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise UserError(f"{zip_path} is not a readable zip archive: {error}") from None
    with archive:
        entries = archive.infolist()
        for entry in entries:
            name = entry.filename
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise UserError(f"refusing to extract {zip_path}: entry {name!r} is a symbolic link")
            parts = PurePosixPath(name.replace("\\", "/")).parts
            escapes = (name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0])
                       or not (target / name).resolve().is_relative_to(target))
            if escapes:
                raise UserError(f"refusing to extract {zip_path}: entry {name!r} would land outside {target}")
        # The sizes are those the archive declares; zipfile never writes more than that per entry.
        total = sum(entry.file_size for entry in entries)
        if total > max_bytes:
            raise UserError(f"refusing to extract {zip_path}: it unpacks to {total / 1e9:.1f} GB, "
                            f"over the {max_bytes / 1e9:.1f} GB limit")
        target.mkdir(parents=True, exist_ok=True)
        try:
            archive.extractall(target)
        except (OSError, zipfile.BadZipFile) as error:
            raise UserError(f"could not extract {zip_path}: {error}") from None


# ---------------------------------------------------------------- few-shot and base/novel

def few_shot(items, shots, seed) -> list[Item]:
    """K items per label, as Dassl's `generate_fewshot_dataset` after `random.seed(seed)`.

    `seed` is an int or a `random.Random` to continue. Labels are visited in order of first
    appearance; a label with fewer than K items keeps all of them. `shots` <= 0 or "all": everything.
    """
    if shots == "all" or int(shots) <= 0:
        return list(items)
    shots = int(shots)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    groups = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    chosen = []
    for group in groups.values():
        # Dassl samples even when a label has exactly K items (drawing from the stream); so do we.
        chosen += rng.sample(group, shots) if len(group) >= shots else group
    return chosen


def few_shot_splits(splits: Splits, shots, seed: int) -> Splits:
    """Train K-shot, then val min(K, 4)-shot from the same random stream (as official); test untouched.

    A class with fewer than K training images trains on all it has, and one warning line says so.
    """
    if shots == "all" or int(shots) <= 0:
        check_every_class_trains(splits, f"dataset {splits.name}")
        return splits
    rng = random.Random(seed)
    train = few_shot(splits.train, shots, rng)
    val = few_shot(splits.val, min(int(shots), 4), rng)
    sampled = replace(splits, train=train, val=val)
    check_every_class_trains(sampled, f"dataset {splits.name}")
    short = {name: count for name, count in shots_per_class(sampled).items() if count < int(shots)}
    if short:
        listed = ", ".join(f"{name} ({count})" for name, count in short.items())
        print(f"warning: {int(shots)} shots asked, but {len(short)} class(es) of {splits.name} have fewer "
              f"training images and train on all they have: {listed}", file=sys.stderr)
    return sampled


def shots_per_class(splits: Splits) -> dict[str, int]:
    """{class name: training images} in label order: the shots each class really trains on."""
    counts = [0] * len(splits.classnames)
    for item in splits.train:
        counts[item.label] += 1
    return dict(zip(splits.classnames, counts))


def subsample_classes(splits: Splits, subsample: str) -> Splits:
    """Base = the first ceil(n/2) labels of the train set, novel = the rest; each relabelled from 0."""
    if subsample not in ("all", "base", "novel"):
        raise UserError(f"subsample must be all, base or novel, not '{subsample}'")
    # Base and novel are cut from the labels present in train: a class missing there would shift them.
    check_every_class_trains(splits, f"dataset {splits.name}")
    if subsample == "all":
        return splits
    labels = sorted({item.label for item in splits.train})
    half = math.ceil(len(labels) / 2)
    kept = labels[:half] if subsample == "base" else labels[half:]
    new_label = {old: new for new, old in enumerate(kept)}

    def relabel(items):
        return [Item(i.path, new_label[i.label], i.classname) for i in items if i.label in new_label]

    return Splits(relabel(splits.train), relabel(splits.val), relabel(splits.test),
                  [splits.classnames[old] for old in kept], splits.name)


# ---------------------------------------------------------------- images

def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image from any PIL mode (grey, palette, alpha, 16-bit, float)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # convert("RGB") clips these at 255, and scans rarely fill 16 bits (12 is common):
        # stretch the image's own range to 8 bits.
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # a copy even for RGB, so it outlives the opened file


def open_image(path: str) -> Image.Image:
    if Path(path).suffix.lower() == ".dcm":
        return open_dicom(path)
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"cannot read image file {path}: {error}") from None


DICOM_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or pip install python-gdcm"


def _dicom_number(ds, keyword):
    """The first value of a numeric DICOM attribute (Window Center/Width may list several), or None."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return float(value[0] if isinstance(value, Sequence) else value)


def open_dicom(path: str) -> Image.Image:
    """A DICOM file as an 8-bit RGB image, the way a viewer first shows it.

    Grey images: Rescale Slope/Intercept, then the file's first window (Window Center/Width,
    the DICOM linear function), or the image's own min-max when it has none; MONOCHROME1
    (white = low) is inverted. A multi-frame file (a volume or a cine loop) gives its middle
    frame. Windows stored per frame (enhanced multi-frame files) are not read: min-max then.
    """
    import pydicom  # only needed for .dcm files

    syntax = None
    try:
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:  # no 128-byte preamble: older files often lack it
            ds = pydicom.dcmread(path, force=True)
            if "TransferSyntaxUID" not in ds.file_meta:  # then the standard's default encoding
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        if "PixelData" not in ds:
            raise UserError(f"DICOM file {path} holds no image (no Pixel Data element): leave it out")
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        pixels = ds.pixel_array
        return _dicom_to_rgb(ds, pixels, path)
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (RuntimeError, NotImplementedError) as error:  # pydicom's words for "no decoder for this"
        reason = " ".join(str(error).split())
        raise UserError(f"cannot decode DICOM file {path}: its pixel data is "
                        f"{getattr(syntax, 'name', 'compressed')} ({reason}); install a decoder: "
                        f"{DICOM_DECODERS}") from None
    except UserError:
        raise
    except Exception as error:  # a damaged file or header: pydicom raises many types for these
        raise UserError(f"cannot read DICOM file {path}: {type(error).__name__}: {error}") from None


def _dicom_to_rgb(ds, pixels, path):
    interpretation = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    if pixels.ndim == (3 if colour else 2) + 1:
        pixels = pixels[len(pixels) // 2]  # (frames, rows, cols[, 3]) -> the middle frame
    if colour:
        # pydicom 3 hands colour pixels over as RGB (it converts YBR); only the bit depth is ours.
        if pixels.dtype != np.uint8:
            pixels = pixels.astype(np.float64) * (255 / (2 ** int(ds.get("BitsStored", 16)) - 1))
        return Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    if not interpretation.startswith("MONOCHROME"):
        raise UserError(f"DICOM file {path} is {interpretation}, which we do not read: "
                        "convert it to PNG (grey MONOCHROME1/2 and RGB/YBR colour are read)")
    slope, intercept = _dicom_number(ds, "RescaleSlope"), _dicom_number(ds, "RescaleIntercept")
    values = pixels.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    center, width = _dicom_number(ds, "WindowCenter"), _dicom_number(ds, "WindowWidth")
    if center is not None and width is not None and width >= 1:
        # PS3.3 C.11.2.1.2.1: black up to c - 0.5 - (w - 1) / 2, white from c - 0.5 + (w - 1) / 2.
        scaled = np.clip((values - (center - 0.5)) / max(width - 1, 1) + 0.5, 0, 1) * 255
    else:
        low, high = values.min(), values.max()
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    if interpretation == "MONOCHROME1":
        scaled = 255 - scaled
    return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")


SYNTHETIC_SIZES = {"train": 32, "val": 8, "test": 40}  # images per class
SYNTHETIC_LOOKS = {  # class name -> (hue, shape, outline, fill); also the source of its class text
    "red disc": (0.0, "round disc", "a smooth round outline", "a solid even fill"),
    "green square": (0.33, "square block", "a straight outline with four sharp corners", "a solid even fill"),
    "blue striped patch": (0.62, "square patch of parallel stripes", "a straight outline with four sharp corners",
                     "alternating coloured and grey bands"),
    "yellow checkered patch": (0.15, "square patch of checkers", "a straight outline with four sharp corners",
                            "alternating coloured and grey tiles"),
}


def _synthetic_splits(image_size):
    names = list(SYNTHETIC_LOOKS)
    parts = {split: [Item(f"synthetic:{split}:{i}:{image_size}", i % len(names), names[i % len(names)])
                     for i in range(per_class * len(names))]
             for split, per_class in SYNTHETIC_SIZES.items()}
    return Splits(**parts, classnames=names, name="synthetic")


def draw_synthetic(path: str) -> Image.Image:
    """The image of a synthetic item `synthetic:<split>:<index>:<size>`: a noisy coloured shape."""
    _, split, index, size = path.split(":")
    index, size = int(index), int(size)
    label = index % len(SYNTHETIC_LOOKS)
    hue = list(SYNTHETIC_LOOKS.values())[label][0]
    # Seeded by the item alone, so an image is the same in every run, order and worker.
    rng = np.random.default_rng([zlib.crc32(split.encode()), index])
    y, x = np.mgrid[0:size, 0:size] / size  # (S, S) each, in [0, 1)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    half = rng.uniform(0.15, 0.3)  # radius of the disc, half side of the others
    if label == 0:
        mask = (x - cx) ** 2 + (y - cy) ** 2 < half**2
    else:
        mask = (abs(x - cx) < half) & (abs(y - cy) < half)
        period = rng.uniform(0.1, 0.16)
        if label == 2:  # stripes at a random angle
            angle = rng.uniform(0, np.pi)
            mask &= np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) > 0
        elif label == 3:
            mask &= (np.floor((x - cx) / period) + np.floor((y - cy) / period)) % 2 == 0
    colour = colorsys.hsv_to_rgb((hue + rng.uniform(-0.04, 0.04)) % 1, rng.uniform(0.6, 1), rng.uniform(0.7, 1))
    pixels = np.where(mask[..., None], np.array(colour), rng.uniform(0.15, 0.45))  # (S, S, 3)
    pixels = pixels + rng.normal(0, 0.08, size=pixels.shape)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8))


def build_transform(size: int, mean=None, std=None, train: bool = False, hflip: bool = False,
                    resize_first: bool = False):
    """CoOp's transforms at `size` (bicubic); no Normalize when mean/std are None (values in [0, 1]).
    `resize_first` (AttrVR / BioMedVR) resizes the shorter side to `size` before the random crop,
    so the crop's 8-100% area is taken of that small image, not of the full-resolution source."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    steps = [T.Lambda(to_rgb)]
    if train:
        if resize_first:
            steps.append(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC))
        steps.append(T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC))
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps += [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    steps.append(T.ToTensor())
    if mean is not None:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s random draws in `epoch` of a run seeded `seed` (63 bits)."""
    digest = hashlib.sha256(f"sample:{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) for each Item; synthetic items are drawn, the others read from disk.

    `dataset[(index, seed)]` (what `EpochSampler` hands out) runs the transform's random draws
    (torchvision's v1 transforms draw from the global CPU generator) from `seed` alone, on a forked
    generator state, so an augmentation is the same in the main process and in any worker, and the
    caller's own random stream is left as it was. `dataset[index]` draws from `draw_seed(0, 0, index)`.
    """

    def __init__(self, items, transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, draw_seed(0, 0, key))
        item = self.items[index]
        image = draw_synthetic(item.path) if item.path.startswith("synthetic:") else open_image(item.path)
        # torch.manual_seed would also reseed CUDA's generators: only the CPU one is forked and seeded.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image), item.label


class EpochSampler(torch.utils.data.Sampler):
    """The (index, draw seed) pairs of one pass over `n` samples: shuffled or in order, a function
    of (seed, epoch) alone, as is each sample's draw seed (`draw_seed(seed, epoch, index)`). The
    training loop calls `set_epoch(epoch)` before each pass, so a resumed run repeats the epochs of
    an uninterrupted one and no worker count changes a number."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = range(self.n)
        if self.shuffle:
            digest = hashlib.sha256(f"order:{self.seed}:{self.epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            order = torch.randperm(self.n, generator=generator).tolist()
        return iter([(i, draw_seed(self.seed, self.epoch, i)) for i in order])


def ignore_ctrl_c(worker_id: int):
    """A loader worker leaves Ctrl-C to the main process, which stops the workers itself: a worker
    that took the SIGINT a terminal sends to the whole process group would print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers never see Ctrl-C: they are started (forked, every epoch) while the
    main process holds Ctrl-C back, and ignore it from their first line (`ignore_ctrl_c`); the main
    process takes a Ctrl-C of those milliseconds right after and stops the workers itself."""

    def __iter__(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        caught = []
        previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
        try:
            iterator = super().__iter__()
        finally:
            signal.signal(signal.SIGINT, previous)
        if caught:
            del iterator  # stops its workers
            raise KeyboardInterrupt
        return iterator


def make_loader(dataset, batch_size: int, train: bool, seed: int, workers: int = 0, drop_last: bool = True):
    """Shuffled for training, ordered for test. A training loader drops the last partial batch
    when there is a full one (Dassl, BiomedAP); `drop_last=False` keeps every image (BioMedVR).
    The order and every augmentation follow from (seed, epoch, sample index): `EpochSampler`."""
    # The loader's own seeded generator only seeds the workers' streams, which nothing draws from;
    # checkpoints keep its state (common.training_state).
    return Loader(
        dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle=train),
        drop_last=drop_last and train and len(dataset) >= batch_size,
        num_workers=workers, generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_ctrl_c,
        pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------- class text

MIN_SENTENCES = {"descriptions": 20, "distinctive": 5, "confusions": 5}
MIN_CONFUSION_WORDS = 20


def validate_class_text(text, source: str) -> None:
    """Check the schema of prompts/*.json; raise UserError naming `source` and the problem."""
    def bad(problem):
        return UserError(f"class text {source}: {problem}")

    if not isinstance(text, dict):
        raise bad("the top level must be an object with template, ctx_init and classes")
    for key, kind in (("template", str), ("ctx_init", str), ("classes", dict)):
        if not isinstance(text.get(key), kind):
            raise bad(f'"{key}" must be {"a string" if kind is str else "an object of classes"}')
    if text["template"].count("{}") != 1:
        raise bad(f'"template" must contain exactly one {{}}, got {text["template"]!r}')
    if not text["ctx_init"].strip() or not text["template"].startswith(text["ctx_init"]):
        raise bad(f'"template" {text["template"]!r} must start with "ctx_init" {text["ctx_init"]!r}')
    if not text["classes"]:
        raise bad('"classes" is empty')
    for name, entry in text["classes"].items():
        if not isinstance(entry, dict):
            raise bad(f'class "{name}" must be an object with {", ".join(MIN_SENTENCES)}')
        for field, minimum in MIN_SENTENCES.items():
            sentences = entry.get(field)
            if not isinstance(sentences, list) or not all(isinstance(s, str) and s.strip() for s in sentences):
                raise bad(f'class "{name}": "{field}" must be a list of non-empty strings')
            if len(sentences) < minimum:
                raise bad(f'class "{name}": "{field}" has {len(sentences)} sentences, at least {minimum} needed')
        short = [s for s in entry["confusions"] if len(s.split()) < MIN_CONFUSION_WORDS]
        if short:
            raise bad(f'class "{name}": each confusion needs at least {MIN_CONFUSION_WORDS} words, '
                      f"not {short[0]!r}")


def synthetic_class_text() -> dict:
    """Class text for the synthetic set, in the schema of prompts/*.json, built from its looks."""
    places = ["near the centre of the image", "shifted towards one side of the image",
              "small compared with the whole frame", "large and filling much of the frame"]
    classes = {}
    for name, (_, shape, outline, fill) in SYNTHETIC_LOOKS.items():
        colour = name.split()[0]
        frames = [f"a {colour} {shape} on a noisy grey background, {{}}.",
                  f"an image with one {shape} in {colour}, {{}}.",
                  f"a {shape} with {outline}, {{}}.",
                  f"a {shape} showing {fill}, {{}}.",
                  f"a bright {colour} object shaped like a {shape}, {{}}."]
        confusions = []
        for other, (_, _, other_outline, other_fill) in SYNTHETIC_LOOKS.items():
            if other != name:
                confusions += [
                    f"a {name} can be confused with a {other} when heavy noise hides the details, but a "
                    f"{name} is {colour} with {fill}, while a {other} is {other.split()[0]} with {other_fill}.",
                    f"when the object is small or cut by the crop, a {name} may look like a {other}; compare "
                    f"the outline, {outline} for a {name} against {other_outline} for a {other}."]
        classes[name] = {
            "descriptions": [frame.format(place) for frame in frames for place in places],
            "distinctive": [f"the object is {colour}, a colour that no other class uses.",
                            f"the object in the image is a {shape}.",
                            f"the border of the object is {outline}.",
                            f"inside its border the object shows {fill}.",
                            f"only this class combines the colour {colour} with {fill}."],
            "confusions": confusions,
        }
    return {"template": "a photo of a {}.", "ctx_init": "a photo of a", "classes": classes}


# Prompt perturbations for BiomedAP's robustness evaluation (the protocol: biomedap.py's docstring).
PERTURBATIONS = ("clinical", "generic", "article", "minimal", "typo", "descriptive")


def typo_template(template, ctx_init, rate=0.2):
    """Substitute ~rate of the non-space characters of the fixed part (after ctx_init, class slot kept)."""
    head, tail = template[:len(ctx_init)], template[len(ctx_init):]
    slot = tail.index("{}")
    eligible = [i for i, ch in enumerate(tail) if not ch.isspace() and not slot <= i < slot + 2]
    rng, chars = random.Random(f"typo:{template}"), list(tail)
    for i in rng.sample(eligible, max(1, round(rate * len(eligible))) if eligible else 0):
        chars[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != chars[i].lower()])
    return head + "".join(chars)


def perturbed_sentences(text, classnames):
    """{perturbation: one sentence per class}, in the order of PERTURBATIONS."""
    t, names = text["template"], list(classnames)
    typo = typo_template(t, text["ctx_init"])
    return {"clinical": [t.format(c) for c in names], "generic": [f"a photo of a {c}." for c in names],
            "article": [f"a {c}." for c in names], "minimal": list(names),
            "typo": [typo.format(c) for c in names],
            "descriptive": [f"{t.format(c)} {text['classes'][c]['descriptions'][0]}" for c in names]}


def load_class_text(dataset: str, classnames: list[str], root: str = "data") -> dict:
    """The class text of a dataset, checked and restricted to `classnames` in that order.

    Benchmarks read prompts/<name>.json, your own folder its prompts.json, synthetic its built-in
    text. `root` is accepted so callers can pass the arguments they gave load_splits.
    """
    if dataset.lower() == "synthetic":
        text, source = synthetic_class_text(), "built-in synthetic text"
    else:
        if dataset.lower() in DATASETS:
            path = PROMPTS_DIR / f"{dataset.lower()}.json"
        else:
            path = Path(dataset) / "prompts.json"
        if not path.is_file():
            raise UserError(f"this method needs class text but {path} does not exist: write it in the "
                            "schema of prompts/*.json (template, ctx_init, and per class descriptions, "
                            "distinctive and confusions)")
        try:
            text = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read class text {path}: {error}") from None
        source = str(path)
    validate_class_text(text, source)
    missing = [name for name in classnames if name not in text["classes"]]
    if missing:
        raise UserError(f"{source} has no text for the class(es) {', '.join(missing)}; its classes are "
                        f"{', '.join(text['classes'])} (names must match the split's class names)")
    return {"template": text["template"], "ctx_init": text["ctx_init"],
            "classes": {name: {field: list(text["classes"][name][field]) for field in MIN_SENTENCES}
                        for name in classnames}}
