"""Datasets: the BiomedCoOp few-shot benchmark, BioMedVR's natural-image benchmarks, your own
image folders, and a synthetic set.

A dataset is named on the command line as one of four things:
  * a medical benchmark (`btmri`, `busi`, ...; MEDICAL): `<root>/<DIR>/split_<DIR>.json` with the
    images under `<root>/<DIR>/<DIR>/`, fetched from huggingface.co/datasets/TahaKoleilat/BiomedCoOp
    by `--download`;
  * a natural-image benchmark (`caltech101`, `dtd`, ...; NATURAL, BioMedVR's Table 3) in CoOp's
    data layout (`<root>/dtd/images/` and `<root>/dtd/split_zhou_DescribableTextures.json`), fetched
    by hand as CoOp's DATASETS.md says; each underscore of its class names becomes a space, as
    CoOp's trainers do before building any text ("car_side" -> "car side");
  * a path to your own folder: with a `split.json`, with split folders (`train/`, `val/`, `test/`)
    of class sub-folders, or with one sub-folder per class (split 80/20 here); and its `prompts.json`;
  * `synthetic`: four classes of generated shapes, made in memory, for smoke runs and tests.
A bare name is the benchmark even where a folder of that name exists; `./btmri` is the folder.
Whatever is read, `load_splits` keeps an account of it (the layout, images per split and class,
every file left out and why), which a run prints before training and keeps in metrics.json.

The few-shot subsets and base/novel classes follow the official pipeline (Dassl's
`generate_fewshot_dataset` and the `subsample_classes` of each BiomedCoOp and CoOp dataset), so the
same split file and seed give the same images as the papers.

The class text the methods anchor on (prompts.json, its checks, writing it) is classtext.py's.

Sections, in order, each readable on its own: the registry; split files and image files (what
counts as an image, the check before training); loading a dataset (benchmarks, your own folders
in their three layouts); the account of what was read; download; few-shot and base/novel; decoding images as a viewer shows them (`to_rgb`,
`open_image`, DICOM through pydicom's display functions); the synthetic set (its images and its
class text); transforms and loaders (each random draw a function of seed, epoch and index).
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
import unicodedata
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from tqdm import tqdm

from common import UserError, one_line

# ---------------------------------------------------------------- registry

# Two kinds of benchmark, kept apart. MEDICAL: the eleven datasets of the BiomedCoOp benchmark, which
# both papers' main tables use (--download fetches them). NATURAL: the seven natural-image
# benchmarks of BioMedVR's Table 3, in the data folder that CoOp, CoCoOp, MaPLe and their successors
# document (fetched by hand; no download here).
MEDICAL = {  # CLI name -> folder name (Dassl's DATASET.NAME)
    "btmri": "BTMRI", "busi": "BUSI", "chmnist": "CHMNIST", "covid": "COVID_19",
    "ctkidney": "CTKidney", "dermamnist": "DermaMNIST", "kneexray": "KneeXray",
    "kvasir": "Kvasir", "lungcolon": "LungColon", "octmnist": "OCTMNIST", "retina": "RETINA",
}


@dataclass(frozen=True)
class CoOpLayout:
    """Where a natural-image benchmark lies under --root, as CoOp's DATASETS.md lays it out."""
    folder: str  # <root>/<folder>/
    images: str  # <root>/<folder>/<images>/: the split file's paths are relative to it
    split: str  # <root>/<folder>/<split>: {"train"|"val"|"test": [[relative path, label, class name], ...]}
    section: str  # its section of DATASETS.md, which says what to fetch
    classes: int  # classes in CoOp's split file: another count is warned about


NATURAL = {  # CLI name -> its layout; the CLI name is the folder's, except for caltech101 and food101
    "caltech101": CoOpLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "caltech101", 100),
    "food101": CoOpLayout("food-101", "images", "split_zhou_Food101.json", "food101", 101),
    "dtd": CoOpLayout("dtd", "images", "split_zhou_DescribableTextures.json", "dtd", 47),
    "eurosat": CoOpLayout("eurosat", "2750", "split_zhou_EuroSAT.json", "eurosat", 10),
    "oxford_pets": CoOpLayout("oxford_pets", "images", "split_zhou_OxfordPets.json", "oxfordpets", 37),
    "oxford_flowers": CoOpLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "flowers102", 102),
    "ucf101": CoOpLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "ucf101", 101),
}
COOP_DATASETS = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
BENCHMARKS = (*MEDICAL, *NATURAL)  # every benchmark's CLI name: its run folders' and prompts/<name>.json's


def benchmarks_line() -> str:
    """The benchmarks by kind, in one line, for --help and the unknown-dataset error."""
    return (f"medical benchmarks (--download fetches them): {' '.join(MEDICAL)}; natural benchmarks "
            f"(in CoOp's data folder, fetched by hand): {' '.join(NATURAL)}")


# Label order of the medical benchmarks' split files. The loader always reads names and order from
# the split file itself; this table is what their prompts/*.json are checked against.
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
DICOM_EXTENSIONS = {".dcm", ".dicom"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"} | DICOM_EXTENSIONS
# Split folders of your own folder (torchvision's ImageFolder per split, as Kaggle ships them),
# case-blind: folder name -> split.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
# Volume formats that are not read: refused by name (open_image, your own folders, --predict).
VOLUME_FORMATS = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage",
                  ".mhd": "MetaImage"}
TEST_PERCENT = 20  # your own folder of class sub-folders: each class's test share; the rest trains
RUN_FILES = ("metrics.json", "checkpoint.pt")  # a folder holding one is a run's folder, never read as images
MAX_ASPECT = 20  # longest side over shortest: beyond it an image is refused (see _check_size)
EXIF_ORIENTATION = 0x0112


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
    # What was read, made once by load_splits and kept through few_shot_splits and subsample_classes:
    # the layout, images per split and class, every file left out and why (`data_account`).
    account: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------- split files

def read_split_file(path, image_dir=None, underscores_as_spaces: bool = False, left_out=None) -> dict[str, list[Item]]:
    """Read `{"train"|"val"|"test": [[relative_path, label, "class name"], ...]}` (UTF-8, with or
    without a byte order mark).

    Paths are relative to `image_dir`: by default `<DIR>/` beside an official `split_<DIR>.json`,
    otherwise the split file's own folder (your own `split.json`). `underscores_as_spaces`: each
    "_" of a class name becomes " " before any check (CoOp's split files: "car_side" is "car side").
    An image listed twice in one split is read once; the repeat is appended to `left_out` as
    (path, "duplicate", detail).
    """
    path = Path(path)
    if image_dir is None:
        official = path.name == f"split_{path.parent.name}.json"
        image_dir = path.parent / path.parent.name if official else path.parent
    image_dir = Path(image_dir)
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte order mark is no problem
    except OSError as error:
        raise UserError(f"cannot read split file {path}: {error.strerror or error}") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"split file {path} is not valid JSON: {error}") from None

    def wrong(problem):
        return UserError(f"split file {path} has the wrong format: {problem} (expected "
                         '{"train"|"val"|"test": [[relative_path, label, "class name"], ...]})')

    if not isinstance(content, dict) or not all(isinstance(content.get(s), list) for s in SPLIT_NAMES):
        raise wrong('it needs the keys "train", "val" and "test", each a list')
    parts, names, owner = {}, {}, {}  # names: label -> class name, over all three splits; owner: path -> (split, item)
    for split in SPLIT_NAMES:
        parts[split] = []
        for index, entry in enumerate(content[split]):
            ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                  and type(entry[1]) is int and entry[1] >= 0 and isinstance(entry[2], str) and entry[2])
            if not ok:
                raise wrong(f'"{split}" entry {index} is {json.dumps(entry)[:120]}')
            relative, label, classname = entry[0], entry[1], nfc(entry[2])
            if underscores_as_spaces:
                classname = classname.replace("_", " ")
            if names.setdefault(label, classname) != classname:
                raise wrong(f'label {label} is called both "{names[label]}" and "{classname}"')
            item = Item(os.path.abspath(image_dir / relative), label, classname)
            other, first = owner.setdefault(item.path, (split, item))
            if other == split and first is not item:
                if first.label != label:
                    raise UserError(f'split file {path} lists {relative} twice in "{split}", as "{first.classname}" '
                                    f'and as "{classname}": an image has one class; keep one entry')
                if left_out is not None:
                    left_out.append((item.path, "duplicate", f'listed twice in "{split}"'))
                continue
            parts[split].append(item)
            if other != split:
                raise UserError(f'split file {path} lists {relative} in both "{other}" and "{split}": an image '
                                "in two splits is tested on what it trained on; keep it in one")
    if not parts["train"] or not parts["test"]:
        raise wrong('"train" and "test" must not be empty')
    if sorted(names) != list(range(len(names))) or len(set(names.values())) != len(names):
        raise wrong(f"labels must be 0..n-1 with one distinct name each, found {dict(sorted(names.items()))}")
    return parts


def _classnames(items) -> list[str]:
    names = {item.label: item.classname for item in items}
    return [names[label] for label in sorted(names)]


def nfc(name: str) -> str:
    """One spelling of a class name: macOS writes folder names decomposed (e + combining accent),
    other systems and editors composed; both must give the same class."""
    return unicodedata.normalize("NFC", name)


def printable(path) -> str:
    """A path or text that prints and writes as UTF-8: bytes of a file name that are not UTF-8 (which
    Python keeps as lone surrogates) are shown as \\xNN."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that no file name gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def listed(names, limit: int = 10) -> str:
    """Up to `limit` of `names`, joined by commas, then ", ..." when there are more: a warning
    stays one readable line however many classes it names."""
    names = list(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def files_under(folder, runs=None) -> list[Path]:
    """Every file below `folder`, sorted: symbolic links to folders are followed, each real folder
    once (a link back up would loop forever), and names starting with "." are left out. A folder
    holding a run (metrics.json or checkpoint.pt: RUN_FILES) is left out with all below it, and
    appended to `runs` when given: a run's pictures are never read as images."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        info = os.stat(top)
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        if any(name in files for name in RUN_FILES):
            dirs[:] = []
            if runs is not None:
                runs.append(Path(top))
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top, f) for f in files if not f.startswith(".") and os.path.isfile(os.path.join(top, f))]
    return sorted(found)


def volume_format(path) -> str | None:
    """The name of a volume format that is not read ("NIfTI", ...: VOLUME_FORMATS), or None."""
    name = Path(path).name.lower()
    return next((kind for suffix, kind in VOLUME_FORMATS.items() if name.endswith(suffix)), None)


def refuse_volumes(paths, where) -> None:
    """One line for volume files (NIfTI, NRRD, MetaImage) among `paths`: they are not read, and
    how to turn them into images. Without this they would be skipped without a word."""
    volumes = [p for p in paths if volume_format(p)]
    if volumes:
        kinds = " and ".join(sorted({volume_format(p) for p in volumes}))
        raise UserError(f"{len(volumes)} {kinds} volume file(s) in {printable(where)}, e.g. {printable(volumes[0])}: "
                        f"{kinds} is not read; export the slices to use as PNG or DICOM files (e.g. with nibabel "
                        "or SimpleITK) and move the volumes out of the image folders")


def is_image_file(path) -> bool:
    """An image by its extension, or a DICOM file by its content (only read when the extension is not
    known); a DICOMDIR (a CD's index, no pixels) is not one."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS or (Path(path).name != "DICOMDIR" and is_dicom(path))


def find_images(inputs) -> list[Path]:
    """Image files named on the command line: files as given, folders searched recursively
    (files_under, is_image_file), in sorted order; volume files in a folder are refused by name."""
    found = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files = files_under(path)
            refuse_volumes(files, path)
            found += [p for p in files if is_image_file(p)]
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{printable(name)} is neither an image file nor a folder")
    if not found:
        raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}, or DICOM by content) in "
                        f"{' '.join(printable(name) for name in inputs)}")
    return found


def warn_identical_images(parts, source) -> list[tuple[str, str]]:
    """One warning line when test images have the same bytes as training images (one file saved under
    two names): the test score then measures memory. Only files whose sizes collide are hashed.
    Returns the (test, train) pairs."""
    sizes = {}  # size -> {split: [paths]}
    for split in ("train", "test"):
        for path in {item.path for item in parts[split] if not item.path.startswith("synthetic:")}:
            sizes.setdefault(os.path.getsize(path), {}).setdefault(split, []).append(path)
    pairs = []
    for by_split in sizes.values():
        if len(by_split) == 2:
            digests = {}
            for path in sorted(by_split["train"]):
                with open(path, "rb") as f:
                    digests.setdefault(hashlib.file_digest(f, "blake2b").digest(), path)
            for path in sorted(by_split["test"]):
                with open(path, "rb") as f:
                    twin = digests.get(hashlib.file_digest(f, "blake2b").digest())
                if twin is not None:
                    pairs.append((path, twin))
    if pairs:
        pairs.sort()
        shown = ", ".join(f"{printable(test)} = {printable(train)}" for test, train in pairs[:2])
        print(f"warning: {len(pairs)} test image(s) of {printable(source)} have the same bytes as a training "
              f"image, so the test score overrates the model: {shown}{', ...' if len(pairs) > 2 else ''}; "
              "remove the copies from one side", file=sys.stderr)
    return pairs


def _check_images_exist(parts, source):
    # Checked once up front: a missing test image would otherwise surface only after training.
    missing = [item.path for items in parts.values() for item in items if not os.path.isfile(item.path)]
    if missing:
        raise UserError(f"{len(missing)} image file(s) listed in {source} do not exist, the first is "
                        f"{missing[0]}; fix the split file or the image folder")


def image_problem(path) -> str | None:
    """Why `path` would not give a training image, or None: the loader's own decoding (open_image),
    so the check accepts exactly what training and evaluation read."""
    problem = _inspect(path)
    return problem[1] if problem[0] else None


def _inspect(path):
    """(problem kind or None, why, frame): frame is (the frame read, of how many) for a file of
    several frames (open_image's "frame"), else None."""
    if not os.path.isfile(path):
        return "unreadable", "the file does not exist", None
    try:
        image = open_image(path, check=True)
    except BlankImage as error:
        return "blank", str(error), None
    except UserError as error:
        return "unreadable", str(error), None
    except Exception as error:  # any of them would stop training later; report it now
        return "unreadable", f"{type(error).__name__}: {one_line(error)}", None
    return None, "", image.info.get("frame")


def check_images_open(items, source) -> list[tuple[str, str, str]]:
    """Raise UserError naming how many images of `items` would not open (or open blank), the first
    and why; return the files of several frames as left-out notes (path, "other frames", which
    frame is read), for the account.

    Run before training so that an unreadable test image fails in seconds, not after hours. Every
    image is decoded once (JPEG at 1/8 scale): about one evaluation pass of image reading.
    """
    paths = list(dict.fromkeys(item.path for item in items if not item.path.startswith("synthetic:")))
    # Threads: the decoders release the GIL, and on network storage the reads overlap.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        found = list(tqdm(pool.map(_inspect, paths), total=len(paths),
                          desc="checking images", leave=False, disable=len(paths) < 2000))
    for kind, what, fix in (("unreadable", "cannot be opened", "fix or remove them before training"),
                            ("blank", "are blank after conversion", "remove them or export them again")):
        failed = [(path, why) for path, (problem, why, _) in zip(paths, found) if problem == kind]
        if failed:
            path, why = failed[0]
            raise UserError(f"{len(failed)} of {len(paths)} image file(s) of {source} {what}, the first "
                            f"is {printable(path)}: {printable(why)}; {fix}")
    return [(path, "other frames", f"frame {index} of {count} is read, the middle one")
            for path, (_, _, frame) in zip(paths, found) if frame for index, count in [frame]]


# ---------------------------------------------------------------- loading a dataset

def is_benchmark_name(dataset) -> bool:
    """Whether `dataset` is a bare benchmark name or `synthetic`, in any case. A bare name always
    means the benchmark, also where a folder of that name exists: `./btmri` or any path with a
    slash names the folder (load_splits says which one it read when both exist)."""
    return str(dataset).lower() in BENCHMARKS or str(dataset).lower() == "synthetic"


def dataset_arg(dataset: str) -> str:
    """The --dataset value a run records: a benchmark's registry name, or a folder's absolute path
    (so evaluation and prediction later find the same folder from anywhere)."""
    dataset = str(dataset)
    if is_benchmark_name(dataset):
        return dataset.lower()
    return str(Path(dataset).resolve()) if Path(dataset).is_dir() else dataset


def dataset_key(dataset: str) -> str:
    """The one name of a dataset, for run folders and summaries.

    A benchmark in any case (`BUSI`, `Oxford_Pets`) gives its registry name (`busi`, `oxford_pets`), `synthetic` gives
    itself, and a folder its own name after resolving (`.` and `./mine/` give the folder's name);
    a folder named like a benchmark gets `_folder` after it (`./btmri` -> `btmri_folder`), so it
    never shares a run folder or a summary row with the benchmark.
    """
    dataset = str(dataset)
    if is_benchmark_name(dataset):
        return dataset.lower()
    name = printable(Path(dataset).resolve().name)  # run folders and summaries are text
    if not name:
        raise UserError(f"dataset folder {dataset} has no name (the file system root): use a sub-folder")
    return f"{name}_folder" if is_benchmark_name(name) else name


def check_out_folder(dataset: str, out) -> None:
    """Refuse an output folder inside your own dataset folder (`--dataset .` with the default
    `runs/` included): the next run would read this run's pictures as images."""
    if is_benchmark_name(dataset) or not Path(dataset).is_dir():
        return
    folder, target = Path(dataset).resolve(), Path(out).resolve()
    if target.is_relative_to(folder):
        raise UserError(f"--out {printable(out)} is inside the dataset folder {printable(folder)}, whose images "
                        f"would then include this run's pictures: give --out a folder outside it, e.g. --out "
                        f"{printable(folder.parent / 'runs')}")


def load_splits(dataset: str, root: str = "data", download: bool = False, split_seed: int = 0,
                image_size: int = 224, show: bool = False) -> Splits:
    """The full train/val/test splits of a benchmark name, your own folder, or `synthetic`, with
    the account of what was read (`Splits.account`), printed first when `show` (print_account).

    `download` fetches a missing medical benchmark; for a natural one it only changes the error's
    wording (they are fetched by hand). `split_seed` only shapes the split of your own folder of class sub-folders: it is not the
    run's seed, so runs with different seeds share one test set; `image_size` only the synthetic
    images. A bare name is the benchmark even where a folder of that name exists (the account
    says so); `./name` is the folder.
    """
    splits = _load_splits(str(dataset), root, download, split_seed, image_size)
    if show:
        print_account(splits)
    return splits


def _load_splits(dataset, root, download, split_seed, image_size):
    if is_benchmark_name(dataset):
        own = Path(dataset).resolve()  # not the benchmark's own folder (a case-blind file system, --root .)
        own = own if own.is_dir() and own != benchmark_folder(dataset.lower(), root).resolve() else None
        if dataset.lower() == "synthetic":
            splits = _synthetic_splits(image_size)
        else:
            hint = own and f"; for your folder {printable(own)}, give --dataset ./{dataset}"
            load = _medical_splits if dataset.lower() in MEDICAL else _natural_splits
            splits = load(dataset.lower(), Path(root), download, hint)
        if own:
            splits.account["meant"] = (f"--dataset {dataset} is the benchmark {splits.name}, not your folder "
                                       f"{printable(own)}: a bare name means the benchmark; "
                                       f"--dataset ./{dataset} reads the folder")
        return splits
    if Path(dataset).is_dir():
        return _folder_splits(Path(dataset), split_seed)
    if "/" in dataset or os.sep in dataset or dataset.startswith("."):
        raise UserError(f"dataset folder {dataset} does not exist")
    raise UserError(f"unknown dataset '{dataset}': use a benchmark ({benchmarks_line()}), synthetic, "
                    "or the path to your own folder with one sub-folder per class")


def _medical_splits(name, root, download, hint=None):
    folder = root / MEDICAL[name]
    split_path = folder / f"split_{folder.name}.json"
    if not split_path.is_file():
        if not download:
            raise UserError(
                f"dataset {name} not found: expected {split_path} with the images under "
                f"{folder / folder.name}/<class>/; add --download to fetch it from "
                f"huggingface.co/datasets/{HF_REPO}, or unzip {folder.name}.zip there by hand{hint or ''}")
        download_dataset(name, root)
    left_out = []
    parts = read_split_file(split_path, left_out=left_out)
    layout = f"benchmark {name}: split file {printable(split_path)}, images under {printable(folder / folder.name)}/"
    return _checked(parts, name, split_path, layout, left_out)


def _natural_splits(name, root, download, hint=None):
    """A natural-image benchmark from CoOp's layout; a missing split file or image folder is one
    line naming what is missing and where CoOp's instructions for fetching it are."""
    layout = NATURAL[name]
    folder = root / layout.folder
    split_path, image_dir = folder / layout.split, folder / layout.images
    missing = [shown for shown, there in ((str(split_path), split_path.is_file()), (f"{image_dir}/", image_dir.is_dir()))
               if not there]
    if missing:
        what, it = " and ".join(missing), "them" if len(missing) > 1 else "it"
        where = f"as CoOp's data instructions say: {COOP_DATASETS}#{layout.section}"
        if download:
            raise UserError(f"--download does not fetch the natural-image benchmarks: fetch {what} by hand {where}")
        raise UserError(f"dataset {name} not found: {what} {'do' if len(missing) > 1 else 'does'} not exist; "
                        f"fetch {it} {where}{hint or ''}")
    left_out = []
    parts = read_split_file(split_path, image_dir=image_dir, underscores_as_spaces=True, left_out=left_out)
    classes = len({item.label for part in parts.values() for item in part})
    if classes != layout.classes:
        print(f"warning: {split_path} has {classes} classes, CoOp's has {layout.classes}: "
              f"results are not comparable with the published ones", file=sys.stderr)
    shown = f"natural benchmark {name}: split file {printable(split_path)}, images under {printable(image_dir)}/"
    return _checked(parts, name, split_path, shown, left_out)


def benchmark_folder(name: str, root) -> Path:
    """The folder of a benchmark under --root (medical: <root>/<DIR>; natural: CoOp's folder)."""
    name = name.lower()
    return Path(root) / (MEDICAL[name] if name in MEDICAL else NATURAL[name].folder if name in NATURAL else "")


def folder_classnames(folder) -> list[str]:
    """The class names of your own folder in label order, in Unicode NFC: those of its split.json,
    else its (train folder's) class sub-folders' (underscores become spaces), as load_splits gives them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give your dataset folder, with one sub-folder per class")
    if (folder / "split.json").is_file():
        return _classnames(sum(read_split_file(folder / "split.json", image_dir=folder).values(), []))
    by_split = split_folders(folder)
    return list(_scan_classes(by_split.get("train", folder), []))


def _folder_splits(folder, seed):
    split_path, left_out, shown = folder / "split.json", [], printable(folder.resolve())
    if split_path.is_file():
        source, parts = split_path, read_split_file(split_path, image_dir=folder, left_out=left_out)
        layout = f"your folder {shown}, split by its split.json"
    elif (by_split := split_folders(folder)):
        source, parts = folder, _split_folder_parts(folder, by_split, left_out)
        layout = (f"your folder {shown} in split folders ({', '.join(d.name + '/' for d in by_split.values())}), "
                  "each with one sub-folder per class")
    else:
        source, parts = folder, _stratified_split(folder, seed, left_out)
        layout = (f"your folder {shown}, one sub-folder per class, split {100 - TEST_PERCENT}/{TEST_PERCENT} "
                  f"train/test per class with split seed {seed} (the same test set for every run)")
    splits = _checked(parts, dataset_key(str(folder.resolve())), source, layout, left_out)  # ./btmri: a folder
    if is_benchmark_name(folder.resolve().name):
        splits.account["meant"] = (f"your folder {shown}, not the benchmark {folder.resolve().name.lower()} (a bare "
                                   f"name means the benchmark); its runs go to {splits.name}/")
    return splits


def _checked(parts, name, source, layout, left_out) -> Splits:
    """Splits from `parts` after the checks every dataset gets before training (two classes or
    more, each with a training image; every image opens; test copies of training images are
    named), with the account of what was read."""
    splits = Splits(**parts, classnames=_classnames(sum(parts.values(), [])), name=name)
    if len(splits.classnames) < 2:
        raise UserError(f"{printable(source)} has {len(splits.classnames)} class ({', '.join(splits.classnames)}): "
                        f"classification needs at least 2 classes, each in its own sub-folder")
    check_every_class_trains(splits, source)
    left_out = left_out + check_images_open(sum(parts.values(), []), source)
    warn_identical_images(parts, source)
    splits.account = _account(splits, source, layout, left_out)
    return splits


def check_every_class_trains(splits: Splits, source) -> None:
    """A class with no training image would get a zero prototype and an untrained prompt: refuse it."""
    trained = {item.label for item in splits.train}
    empty = [name for label, name in enumerate(splits.classnames) if label not in trained]
    if empty:
        raise UserError(f"class(es) {', '.join(repr(n) for n in empty)} of {source} have no training image; "
                        "every class needs at least one: add training images or drop the class")


def class_folders(folder) -> dict[str, Path]:
    """{class name: its sub-folder} of your own folder, in folder-name order: a class is a sub-folder
    (names starting with "." or "__" are not), its name the folder's with underscores as spaces,
    in Unicode NFC; two folders giving one name are an error."""
    class_dirs = sorted(d for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
    if not class_dirs:
        raise UserError(f"{folder} has no class sub-folders: put each class's images in "
                        f"{folder}/<class_name>/ (underscores become spaces), or add a split.json")
    owners = {}
    for class_dir in class_dirs:
        name = nfc(printable(class_dir.name).replace("_", " "))
        other = owners.setdefault(name, class_dir)
        if other != class_dir:
            raise UserError(f"class folders {printable(other)} and {printable(class_dir)} both give the class "
                            f"name '{name}' (underscores become spaces, accents are compared composed): "
                            "merge or rename one")
    return owners


def _loose_files(folder, left_out, read=()):
    """Files at the top of `folder` that no class owns (except the files named in `read`) go to `left_out`."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in read:
            left_out.append((path, "not in a class folder", ""))


def _scan_classes(folder, left_out) -> dict[str, tuple[Path, list[Path]]]:
    """{class name: (its sub-folder, its image files)} of a folder of class sub-folders, in
    folder-name order. A class's images are every file below its sub-folder (files_under) with an
    image extension or DICOM content. Left out, each appended to `left_out` as (path, reason,
    detail): other files, files outside the class folders, a file reached a second time through a
    link, and a sub-folder holding runs (a folder with metrics.json or checkpoint.pt below it: an
    --out inside the dataset, with report.py's pictures beside the runs), which is no class. Volume
    files are refused by name (refuse_volumes); one file in two classes is an error."""
    classes, owner, volumes = {}, {}, []  # owner: real path -> (class, path as found)
    for name, class_dir in class_folders(folder).items():
        runs = []
        files = files_under(class_dir, runs)
        if runs:
            left_out.append((class_dir, "run folder", f"{len(runs)} run(s) below it"))
            continue
        images = []
        for path in files:
            if volume_format(path):
                volumes.append(path)
            elif not is_image_file(path):
                left_out.append((path, "not an image", ""))
            else:
                first_class, first = owner.setdefault(os.path.realpath(path), (name, path))
                if first_class != name:
                    raise UserError(f"{printable(path)} and {printable(first)} are one file in the classes "
                                    f"'{name}' and '{first_class}': an image has one class; keep it in one")
                if first == path:
                    images.append(path)
                else:
                    left_out.append((path, "duplicate", f"the same file as {printable(first)}"))
        classes[name] = (class_dir, images)
    refuse_volumes(volumes, folder)
    _loose_files(folder, left_out, read=("split.json", "prompts.json"))
    return classes


def _stratified_split(folder, seed, left_out):
    """80/20 train/test per class (at least one test image each), seeded; classes in folder-name
    order. No validation split: neither method reads one, so its images train instead.

    Everything is sorted before the shuffle, so the split does not depend on the order the file
    system lists files; `_scan_classes` says what is an image and what is left out.
    """
    rng = random.Random(seed)
    parts = {split: [] for split in SPLIT_NAMES}
    for label, (name, (class_dir, images)) in enumerate(_scan_classes(folder, left_out).items()):
        if len(images) < 2:
            raise UserError(f"class folder {printable(class_dir)} has {len(images)} image(s); each class needs "
                            "at least 2, one to train on and one to test on")
        rng.shuffle(images)
        n_test = max(1, len(images) * TEST_PERCENT // 100)
        parts["test"] += [Item(str(p.absolute()), label, name) for p in images[:n_test]]
        parts["train"] += [Item(str(p.absolute()), label, name) for p in images[n_test:]]
    return parts


def split_folders(folder) -> dict[str, Path]:
    """{split: its folder} when `folder` holds split folders (SPLIT_FOLDERS, case-blind: train/,
    val/, test/, training/, valid/, testing/ ...), in train, val, test order; {} when it holds
    none. A layout that is half of each, or lacks train/ or test/, is an error."""
    found, others = {}, []
    for sub in sorted(d for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith((".", "__"))):
        split = SPLIT_FOLDERS.get(sub.name.lower())
        if split is None:
            runs = []
            files_under(sub, runs)
            if runs:
                continue  # a folder of runs: left out, and said so, by _split_folder_parts
            others.append(sub)
        elif split in found:
            raise UserError(f"{printable(found[split])} and {printable(sub)} are both the {split} split: "
                            "merge them into one folder")
        else:
            found[split] = sub
    if not found:
        return {}
    names = ", ".join(d.name + "/" for d in found.values())
    if others:
        raise UserError(f"{printable(folder)} has split folders ({names}) and other folders "
                        f"({', '.join(d.name + '/' for d in others[:3])}): in a split layout every folder is a split "
                        "(train, val, test) holding the class sub-folders; move the others away")
    missing = [split for split in ("train", "test") if split not in found]
    if missing:
        hint = "; rename val/ to test/ if it is your held-out set" if "val" in found and missing == ["test"] else ""
        raise UserError(f"{printable(folder)} has the split folder(s) {names} but no {' or '.join(missing)}/: a split "
                        f"layout needs train/ and test/ (val/ is optional), each with one sub-folder per class{hint}")
    return {split: found[split] for split in SPLIT_NAMES if split in found}


def _split_folder_parts(folder, by_split, left_out):
    """The splits of a folder of split folders: each split folder's class sub-folders; the same
    classes in every split (labels in the train folder's order)."""
    classes = {split: _scan_classes(split_dir, left_out) for split, split_dir in by_split.items()}
    for sub in sorted(Path(folder).iterdir()):  # split_folders allows no other folders but these
        if sub.is_dir() and not sub.name.startswith((".", "__")) and sub not in by_split.values():
            left_out.append((sub, "run folder", ""))
    _loose_files(folder, left_out, read=("prompts.json",))
    train = list(classes["train"])
    for split, by_name in classes.items():
        if set(by_name) != set(train):
            only_train, only_here = sorted(set(train) - set(by_name)), sorted(set(by_name) - set(train))
            said = "; ".join(f"only in {d.name}/: {', '.join(names[:5])}" for d, names in
                             ((by_split["train"], only_train), (by_split[split], only_here)) if names)
            raise UserError(f"the class folders of {printable(by_split['train'])} and {printable(by_split[split])} "
                            f"differ ({said}): every split folder needs the same class sub-folders")
    label = {name: index for index, name in enumerate(train)}
    parts = {split: [] for split in SPLIT_NAMES}
    for split, by_name in classes.items():
        for name, (_, images) in by_name.items():
            parts[split] += [Item(str(p.absolute()), label[name], name) for p in images]
    return parts


# ---------------------------------------------------------------- the account of what was read

LEFT_OUT_REASONS = {  # the reasons a file is left out, as the account prints them
    "not an image": "not an image (no image extension, no DICOM content)",
    "not in a class folder": "not in a class folder",
    "duplicate": "a second copy of a file already read",
    "other frames": "a volume's other frames (its middle frame is read, as for DICOM)",
    "run folder": "a folder of runs (metrics.json or checkpoint.pt below it), never read as images",
}


def _account(splits, source, layout, left_out) -> dict:
    """The account of what was read, as recorded in metrics.json: the layout, the class names,
    each split's images per class, and every file left out with its reason."""
    base = Path(os.path.abspath(source))
    base = base if base.is_dir() else base.parent

    def shown(path):
        path = Path(os.path.abspath(path))
        return printable(path.relative_to(base) if path.is_relative_to(base) else path)

    images = {}
    for split in SPLIT_NAMES:
        counts = [0] * len(splits.classnames)
        for item in getattr(splits, split):
            counts[item.label] += 1
        images[split] = dict(zip(splits.classnames, counts))
    return {"dataset": splits.name, "source": printable(source), "layout": layout, "classes": list(splits.classnames),
            "images": images, "left_out": [{"path": shown(path), "reason": reason, **({"detail": detail} if detail else {})}
                                           for path, reason, detail in left_out]}


def data_account(splits: Splits) -> dict:
    """What was read, for metrics.json: the account load_splits made (kept by few_shot_splits and
    subsample_classes), or, for Splits made in code, one from the splits themselves."""
    return splits.account or _account(splits, ".", f"{splits.name}, given in code", [])


def _per_class(counts: dict) -> str:
    if len(counts) <= 12:
        return ", ".join(f"{name} {n}" for name, n in counts.items())
    fewest = sorted(counts.items(), key=lambda entry: entry[1])[:3]
    return (f"{min(counts.values())}-{max(counts.values())} per class, fewest: "
            + ", ".join(f"{name} {n}" for name, n in fewest))


def account_lines(account: dict) -> list[str]:
    """The account as a few printable lines: the layout (and which of a benchmark and a folder of
    one name was read), the classes, each split's images per class, and the files left out,
    one line per reason with the first few named (all of them are in metrics.json)."""
    classes = account["classes"]
    lines = [f"data: {account['layout']}"] + ([f"data: {account['meant']}"] if account.get("meant") else [])
    lines.append(f"data: {len(classes)} classes: {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}")
    for split, counts in account["images"].items():
        if sum(counts.values()):
            lines.append(f"data: {split} {sum(counts.values())} images: {_per_class(counts)}")
    by_reason = {}
    for entry in account["left_out"]:
        by_reason.setdefault(entry["reason"], []).append(entry)
    for reason, entries in by_reason.items():
        named = ", ".join(e["path"] + (f" ({e['detail']})" if "detail" in e else "") for e in entries[:3])
        lines.append(f"data: left out {len(entries)} file(s), {LEFT_OUT_REASONS.get(reason, reason)}: "
                     f"{named}{', ...' if len(entries) > 3 else ''}")
    return lines


def print_account(splits: Splits) -> None:
    """Print the account of what was read (account_lines): a run does before training."""
    print("\n".join(account_lines(data_account(splits))), flush=True)


def data_record(splits: Splits) -> dict:
    """What a run's metrics.json keeps of its data: the shots each class trained on
    ("shots_per_class") and the account of what was read ("data")."""
    return {"shots_per_class": shots_per_class(splits), "data": data_account(splits)}


# ---------------------------------------------------------------- download

def download_dataset(name: str, root) -> Path:
    """Fetch `<DIR>.zip` from the Hugging Face hub and unpack it as `<root>/<DIR>`; returns that folder.

    Processes that start it at once (the seeds of a sweep) take turns on `<root>/.<DIR>.lock`:
    the first downloads, the others wait and then find the dataset in place. The lock file and
    the partial unpack folder are removed when the download ends: it succeeded, failed, or was
    stopped by Ctrl-C, SIGTERM (a scheduler's kill) or SIGHUP (a closed terminal).
    """
    import filelock  # a dependency of huggingface_hub; slow to import, only needed here

    Path(root).mkdir(parents=True, exist_ok=True)
    # Held over the check, the download and the rename, so no process ever sees another's
    # half-made target or renames onto it. The file is removed while the lock is held: filelock
    # notices when the file it locked was removed meanwhile and locks the new one instead.
    path = Path(root) / f".{MEDICAL[name]}.lock"
    with ending_signals_raise(), filelock.FileLock(path):
        try:
            return _download_locked(name, root)
        finally:
            with contextlib.suppress(OSError):  # Windows removes it itself, once released
                path.unlink()


@contextlib.contextmanager
def ending_signals_raise():
    """Inside the block, SIGTERM and SIGHUP (a scheduler's kill, a closed terminal) print one line
    and raise SystemExit(128 + the signal's number), the exit status the signal itself would give,
    instead of ending the process at once, which would skip every `finally` (and leave a partial
    download and its lock behind). The handlers before are restored after it. Main thread only:
    elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number, frame):
        print(f"stopped by {signal.Signals(number).name}; the partial download is removed", file=sys.stderr)
        raise SystemExit(128 + number)
    ending = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {number: signal.signal(number, stop) for number in ending}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _download_locked(name, root):
    folder = MEDICAL[name]
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
        try:
            safe_extract(zip_path, scratch)
        except DamagedArchive as error:
            real = os.path.realpath(zip_path)  # the cache keeps the bytes in a blob its snapshot links to
            also = f" and {real}, which it links to" if real != os.path.abspath(zip_path) else ""
            raise UserError(f"the downloaded {folder}.zip in the Hugging Face cache is damaged (an interrupted "
                            f"download?): {error.reason}; delete {zip_path}{also}, then run again with "
                            "--download") from None
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


class DamagedArchive(UserError):
    """A zip that cannot be read to its end (truncated, corrupt); `reason` says what failed."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def safe_extract(zip_path, target_dir, max_bytes: int = MAX_EXTRACT_BYTES) -> None:
    """Extract a zip after checking every entry; nothing is written if any entry is refused.
    A zip that cannot be read to its end raises DamagedArchive."""
    target = Path(target_dir).resolve()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DamagedArchive(f"{zip_path} is not a readable zip archive: {error}", one_line(error)) from None
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
        except (zipfile.BadZipFile, EOFError, zlib.error) as error:  # truncated or corrupt entries
            raise DamagedArchive(f"could not extract {zip_path}: {error}", one_line(error)) from None
        except OSError as error:  # the disk, not the archive
            raise UserError(f"could not extract {zip_path} into {target}: {error.strerror or error}") from None


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
        print(f"warning: {int(shots)} shots asked, but {len(short)} class(es) of {splits.name} have fewer "
              f"training images and train on all they have: {listed(f'{n} ({c})' for n, c in short.items())}",
              file=sys.stderr)
    return sampled


def shots_per_class(splits: Splits) -> dict[str, int]:
    """{class name: training images} in label order: the shots each class really trains on."""
    counts = [0] * len(splits.classnames)
    for item in splits.train:
        counts[item.label] += 1
    return dict(zip(splits.classnames, counts))


def subsample_classes(splits: Splits, subsample: str) -> Splits:
    """Base = the first ceil(n/2) labels of the train set, novel = the rest; each relabelled from 0.

    A half of one class scores 100% whatever the model (and trains with a loss of 0): with two
    classes that is an error, with three (novel has one class, as BUSI's) one warning line, given
    when the novel half is taken.
    """
    if subsample not in ("all", "base", "novel"):
        raise UserError(f"subsample must be all, base or novel, not '{subsample}'")
    # Base and novel are cut from the labels present in train: a class missing there would shift them.
    check_every_class_trains(splits, f"dataset {splits.name}")
    if subsample == "all":
        return splits
    labels = sorted({item.label for item in splits.train})
    half = math.ceil(len(labels) / 2)
    if len(labels) < 3:
        raise UserError(f"base-to-novel needs at least 3 classes, and {splits.name} has {len(labels)}: each half "
                        "would have one class, whose accuracy is 100% whatever the model; use --subsample all")
    if len(labels) == 3 and subsample == "novel":
        print(f"warning: {splits.name} has 3 classes, so its novel half is one class ({splits.classnames[labels[-1]]}): "
              "novel accuracy is 100% whatever the model, which lifts the harmonic mean", file=sys.stderr)
    kept = labels[:half] if subsample == "base" else labels[half:]
    new_label = {old: new for new, old in enumerate(kept)}

    def relabel(items):
        return [Item(i.path, new_label[i.label], i.classname) for i in items if i.label in new_label]

    return Splits(relabel(splits.train), relabel(splits.val), relabel(splits.test),
                  [splits.classnames[old] for old in kept], splits.name, splits.account)


# ---------------------------------------------------------------- images as a viewer shows them

def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image from any PIL mode, upright and as an image viewer shows it.

    * EXIF / TIFF Orientation: the pixels are turned the way the tag says (a phone's sideways JPEG).
    * Transparency (RGBA, LA, PA, P with a transparent colour): composited onto white, the page a
      browser or document viewer shows behind it; when every pixel is fully transparent the alpha
      channel is taken for an export mistake and the colour is shown as it is.
    * 16- and 32-bit integer and float images (I;16, I, F): the image's own finite range,
      min..max, is stretched to 0..255 (scans rarely fill 16 bits, and convert("RGB") would
      clip at 255); NaN and -inf become black, +inf white.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite, (low, high) = np.isfinite(values), finite_range(values)
        scaled = np.where(values == np.inf, 255.0, 0.0)
        if high > low:
            scaled[finite] = (values[finite] - low) * (255 / (high - low))
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)  # (H, W, 4)
        alpha = rgba[..., 3:] / 255
        if not alpha.any():
            return Image.fromarray(rgba[..., :3].astype(np.uint8), "RGB")
        return Image.fromarray((rgba[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8), "RGB")
    return image.convert("RGB")  # a copy even for RGB, so it outlives the opened file


def finite_range(values) -> tuple[float, float]:
    """(min, max) of the finite values of an array; (0, 0) when there are none."""
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


class BlankImage(UserError):
    """An image that decodes to one colour everywhere: nothing to learn from or to classify."""


MULTI_FRAME_FORMATS = ("TIFF", "GIF", "PNG", "WEBP")  # a multi-page TIFF, an animation; not MPO's preview


def open_image(path, check: bool = False) -> Image.Image:
    """An image file (or DICOM, by name or by content) as an upright 8-bit RGB image.

    A file of several frames (a multi-page TIFF, an animated GIF, PNG or WebP, a multi-frame
    DICOM) gives its middle frame, and says which in `image.info["frame"]`: (the frame read,
    counted from 1, of how many). A TIFF's reduced-resolution pages (thumbnails, pyramid levels)
    are not frames. Raises UserError naming the file when it cannot be read, is a volume format
    that is not read (NIfTI, ...), is too elongated (over MAX_ASPECT:1) or over Pillow's pixel
    limit (`Image.MAX_IMAGE_PIXELS`), or BlankImage when it is one colour after conversion.
    `check` (the check before training) decodes a JPEG at 1/8 scale: every byte is still read,
    at an 8th of the work.
    """
    path, drafted, frame = str(path), False, None
    if volume_format(path):
        raise UserError(f"{path} is a {volume_format(path)} volume, which is not read: export its slices as PNG "
                        "or DICOM files (e.g. with nibabel or SimpleITK)")
    if is_dicom(path):
        image = open_dicom(path)
    else:
        try:
            with Image.open(path) as opened:
                _check_size(path, opened.size)
                if opened.format == "PNG" and check:
                    opened.verify()  # every chunk's checksum: corruption a decoder may not notice
                    opened = Image.open(path)
                if opened.format in MULTI_FRAME_FORMATS and getattr(opened, "n_frames", 1) > 1:
                    frame = _seek_middle_frame(opened)
                    _check_size(path, opened.size)
                if opened.format == "JPEG" and check:
                    drafted = opened.draft(opened.mode, (max(1, opened.width // 8), max(1, opened.height // 8))) is not None
                image = to_rgb(opened)
        except FileNotFoundError:
            raise UserError(f"image file not found: {path}") from None
        except Image.DecompressionBombError:  # Pillow refuses at twice its limit, before we see the size
            raise UserError(f"image {path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's limit against "
                            "decompression bombs: shrink it below that first") from None
        except (OSError, SyntaxError, ValueError, TypeError, EOFError) as error:
            raise UserError(f"cannot read image file {path}: {error}") from None
    lows, highs = zip(*image.getextrema())  # per channel
    if lows == highs:
        if drafted:
            return open_image(path)  # blank at 1/8 scale: decide at full size
        raise BlankImage(f"image {path} is blank after conversion to RGB: every pixel is {lows}")
    if frame:
        image.info["frame"] = frame
    return image


def _seek_middle_frame(opened) -> tuple[int, int] | None:
    """Move an opened file of several frames to its middle one; (that frame from 1, count), or
    None when only one page of a TIFF is at full resolution."""
    frames = list(range(opened.n_frames))
    if opened.format == "TIFF":  # NewSubfileType bit 0: a reduced-resolution copy of another page
        full = []
        for index in frames:
            opened.seek(index)
            if not int(opened.tag_v2.get(254, 0)) & 1:
                full.append(index)
        frames = full or frames
    opened.seek(frames[len(frames) // 2])
    return (len(frames) // 2 + 1, len(frames)) if len(frames) > 1 else None


def _check_size(path, size):
    """Refuse an image over Pillow's pixel limit (one limit, `Image.MAX_IMAGE_PIXELS`, in every
    message) or more elongated than MAX_ASPECT:1."""
    width, height = size
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise UserError(f"image {path} is {width}x{height} = {width * height:,} pixels, over Pillow's limit of "
                        f"{Image.MAX_IMAGE_PIXELS:,} pixels against decompression bombs: shrink it below that first")
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        # Resizing the short side to the model's input would blow the long side up to millions of
        # pixels (a 1 x 12000 strip: seconds and gigabytes per image).
        raise UserError(f"image {path} is {width}x{height} pixels, more elongated than {MAX_ASPECT}:1; "
                        "crop it to the region of interest or leave it out")


def is_dicom(path) -> bool:
    """A .dcm / .dicom name, or a file without a known image extension whose bytes are DICOM:
    'DICM' after the 128-byte preamble, or a bare data set starting with a group 0002 or 0008
    element (older files without preamble, e.g. IM000001 on a CD)."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or _bare_dicom(head)


def _bare_dicom(head):
    # Tag (0002,xxxx) or (0008,xxxx) with a small element number, little endian with an explicit VR
    # (two capital letters) or an implicit 4-byte length, or big endian with an explicit VR.
    if len(head) < 8:
        return False
    explicit = head[4:6].isalpha() and head[4:6].isupper()
    if head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0:
        return explicit or int.from_bytes(head[4:8], "little") < 2**16
    return head[:2] in (b"\x00\x02", b"\x00\x08") and head[2] == 0 and explicit


DICOM_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or pip install python-gdcm"
# What the display functions read, copied into one flat data set per frame (enhanced files keep
# them in functional groups, which pydicom's functions do not look into).
DICOM_DISPLAY_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
                          "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
                          "VOILUTFunction", "VOILUTSequence", "PresentationLUTShape")


def _read_dicom(path):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as error:
        with open(path, "rb") as f:
            bare = _bare_dicom(f.read(8))
        if not bare:
            raise UserError(f"{path} is not a DICOM file: no 'DICM' marker after a 128-byte preamble and no "
                            "DICOM data set at its start; export it again, or rename it if it is another "
                            "kind of image") from error
    # No 128-byte preamble and no file meta: older files often lack them; the encoding is the one
    # pydicom found reading the data set.
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = {
            (False, True): pydicom.uid.ExplicitVRLittleEndian, (False, False): pydicom.uid.ExplicitVRBigEndian,
        }.get(tuple(ds.original_encoding), pydicom.uid.ImplicitVRLittleEndian)
    return ds


def open_dicom(path) -> Image.Image:
    """A DICOM file as an 8-bit RGB image, the way a viewer first shows it, by pydicom's own functions.

    The middle frame of a multi-frame file (a volume or a cine loop). Grey (MONOCHROME1/2):
    `apply_modality_lut` (Rescale Slope/Intercept or Modality LUT), then `apply_voi_lut` with the
    first view (VOI LUT Sequence, else Window Center/Width with its LINEAR, LINEAR_EXACT or SIGMOID
    function; per-frame values of enhanced files are used), whose output range becomes 0..255;
    without a VOI, or with an invalid one, the frame's own min..max. MONOCHROME1 and Presentation
    LUT Shape INVERSE are inverted. PALETTE COLOR through `apply_color_lut`; YBR is converted to RGB
    by pydicom's decoding; colour is scaled from Bits Stored to 8 bits.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut

    path, syntax = str(path), None
    try:
        ds = _read_dicom(path)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise UserError(f"DICOM file {path} holds no image (no Pixel Data element): leave it out")
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if "Rows" not in ds or "Columns" not in ds:
            raise UserError(f"DICOM file {path} has pixel data but no Rows or Columns: its header is damaged, "
                            "export it again")
        _check_size(path, (int(ds.Columns), int(ds.Rows)))
        frames = int(ds.get("NumberOfFrames") or 1)
        index = frames // 2
        pixels = pydicom.pixels.pixel_array(ds, index=index if frames > 1 else None)
        interpretation = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if interpretation == "PALETTE COLOR":
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            shown = apply_color_lut(pixels, ds) / (2**bits - 1)
        elif pixels.ndim == 3:  # (rows, cols, 3): RGB, YBR already converted by pydicom
            shown = pixels / (2 ** int(ds.get("BitsStored", 8)) - 1)
        elif interpretation.startswith("MONOCHROME"):
            shown = _dicom_grey(pixels, _frame_view(ds, index))
        else:
            raise UserError(f"DICOM file {path} is {interpretation}, which we do not read: convert it to PNG "
                            "(MONOCHROME1/2, PALETTE COLOR, RGB and YBR are read)")
        shown = np.clip(np.nan_to_num(shown, nan=0.0), 0, 1) * 255  # (rows, cols) or (rows, cols, 3)
        image = Image.fromarray(shown.round().astype(np.uint8)).convert("RGB")
        if frames > 1:
            image.info["frame"] = (index + 1, frames)
        return image
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except UserError:
        raise
    except (RuntimeError, NotImplementedError) as error:  # pydicom's words for "no decoder for this"
        if syntax is not None and syntax.is_compressed:
            raise UserError(f"cannot decode DICOM file {path}: its pixel data is {syntax.name} "
                            f"({one_line(error)}); install a decoder: {DICOM_DECODERS}") from None
        raise UserError(f"cannot read DICOM file {path}: {type(error).__name__}: "
                        f"{one_line(error)}") from None
    except Exception as error:  # a damaged file or header: pydicom raises many types for these
        if "less than expected" in str(error):
            raise UserError(f"DICOM file {path} is truncated: {one_line(error)}") from None
        raise UserError(f"cannot read DICOM file {path}: {type(error).__name__}: "
                        f"{one_line(error)}") from None


def _frame_view(ds, index):
    """A data set with the display attributes of frame `index`: the top level, overridden by the
    shared and then the frame's own functional groups (Pixel Value Transformation, Frame VOI LUT)."""
    import pydicom

    view = pydicom.Dataset()
    view.file_meta = ds.file_meta
    groups = [ds] + [seq[i] for seq, i in ((ds.get("SharedFunctionalGroupsSequence"), 0),
                                          (ds.get("PerFrameFunctionalGroupsSequence"), index))
                     if seq and i < len(seq)]
    for source in groups[:1] + [item for group in groups[1:] for keyword in
                                ("PixelValueTransformationSequence", "FrameVOILUTSequence")
                                for item in (group.get(keyword) or [])[:1]]:
        for keyword in DICOM_DISPLAY_KEYWORDS:
            value = source.get(keyword)
            if value is not None and value != "":
                setattr(view, keyword, value)
    return view


def _dicom_grey(pixels, ds):
    """Stored values of one grey frame -> [0, 1] after the modality and VOI transforms."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    lut = ds.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
        # A lookup table indexes by whole numbers; its own output range is what the display spans.
        first, count = int(lut[0].LUTDescriptor[1]), int(lut[0].LUTDescriptor[0]) or 2**16
        shown = apply_voi_lut(np.round(values).astype(np.int64), ds)
        table = apply_voi_lut(np.arange(first, first + count), ds)
        low, high = float(table.min()), float(table.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            shown = apply_voi_lut(values, ds)
            with np.errstate(over="ignore"):  # the extremes of the sigmoid
                low, high = apply_voi_lut(np.array([-1e300, 1e300]), ds)
        except (ValueError, TypeError, IndexError):  # a width < 1, an unknown function: no VOI
            shown, low, high = values, None, None
    else:
        shown, low, high = values, None, None
    shown = np.asarray(shown, dtype=np.float64)
    if low is None:
        low, high = finite_range(shown)
    scaled = (shown - low) / (high - low) if high > low else np.zeros_like(shown)
    # Presentation LUT Shape INVERSE is how MONOCHROME1 files say it again; on MONOCHROME2 it inverts.
    inverse = (str(ds.get("PhotometricInterpretation")) == "MONOCHROME1"
               or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE")
    return 1 - scaled if inverse else scaled


# ---------------------------------------------------------------- the synthetic set
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
    splits = Splits(**parts, classnames=names, name="synthetic")
    splits.account = _account(splits, ".", f"synthetic: {len(names)} classes of generated shapes, drawn in memory "
                                           f"at {image_size} pixels", [])
    splits.account["source"] = "generated"
    return splits


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
        confusions = []  # 20 words or more, as the papers', and within the tiny backbones' context
        for other, (_, _, other_outline, other_fill) in SYNTHETIC_LOOKS.items():
            if other != name:
                cut = (f"but it has {outline} and the other {other_outline}" if outline != other_outline else
                       f"as both have {outline}; the fill in them tells them apart")
                confusions += [f"in heavy noise a {name} may look like a {other}, but it is {colour} with {fill}, "
                               f"the other {other.split()[0]} with {other_fill}.",
                               f"cut by the crop, a {name} may look like a {other}, {cut}."]
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


# ---------------------------------------------------------------- transforms and loaders
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


@contextlib.contextmanager
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


def ignore_ctrl_c(worker_id: int):
    """A loader worker leaves Ctrl-C to the main process, which stops the workers itself: a worker
    that took the SIGINT a terminal sends to the whole process group would print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers never see Ctrl-C: they are started (forked, every epoch) while the
    main process holds Ctrl-C back, and ignore it from their first line (`ignore_ctrl_c`); the main
    process takes a Ctrl-C of those milliseconds right after and stops the workers itself."""

    def __iter__(self):
        with ctrl_c_held():  # a Ctrl-C is raised once the workers exist; they stop with the iterator
            return super().__iter__()


def make_loader(dataset, batch_size: int, train: bool, seed: int, workers: int = 0, drop_last: bool = True):
    """Shuffled for training, ordered for test. A training loader drops the last partial batch
    when there is a full one (Dassl, BiomedAP); `drop_last=False` keeps every image (BioMedVR).
    The order and every augmentation follow from (seed, epoch, sample index): `EpochSampler`."""
    # Its own generator only seeds the workers' streams, which nothing draws from: the global one is left alone.
    return Loader(
        dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle=train),
        drop_last=drop_last and train and len(dataset) >= batch_size,
        num_workers=workers, generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_ctrl_c,
        pin_memory=torch.cuda.is_available())


if __name__ == "__main__":  # the command that lived here before the class text got its own file
    if sys.argv[1:2] != ["prompts"]:
        sys.exit("data.py is a library: python classtext.py starter FOLDER writes a starter prompts.json")
    print("note: `python data.py prompts` moved to `python classtext.py starter`; it goes in the next release",
          file=sys.stderr)
    os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("classtext.py")), "starter",
                              *sys.argv[2:]])
