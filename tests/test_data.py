"""data.py: the split reader, few-shot sampling against Dassl's rule, base/novel, own folders,
synthetic images, image modes, transforms, loaders, safe download, class text, and each error."""
import json
import multiprocessing
import random
import shutil
import stat
import threading
import zipfile
import zlib
from collections import defaultdict

import huggingface_hub
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import classtext
import data
from common import UserError
from data import Item, Splits


# ------------------------------------------------------------------ helpers
def path_image(path, mode="RGB", size=(12, 10), value=None):
    """A small image of its own for `path`: a colour drawn from the path, a pixel of the path's own
    (two files with the same bytes in train and test are warned about), and a pixel far from the
    background in grey, so that no mode (L, LA, 1, P) turns it into one colour, which the loader
    rightly refuses as blank."""
    rng = np.random.default_rng(len(str(path)))
    if value is None:
        value = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", size, value)
    mark = zlib.crc32(str(path).encode()).to_bytes(4, "little")
    image.putpixel((mark[3] % size[0], 0), tuple(mark[:3]))
    grey = (299 * value[0] + 587 * value[1] + 114 * value[2]) / 1000  # as PIL's convert("L")
    image.putpixel((0, size[1] - 1), (0, 0, 0) if grey >= 128 else (255, 255, 255))
    return image.convert(mode)


def write_png(path, mode="RGB", size=(12, 10), value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path_image(path, mode, size, value).save(path)
    return path


def make_official(root, name="btmri", counts=(5, 3, 2)):
    """A tiny benchmark in the official layout; label order is CLASSNAMES, not alphabetical,
    and the split file lists the classes in reverse so order must come from the labels."""
    folder = data.MEDICAL[name]
    base = root / folder
    split = {}
    for part, count in zip(data.SPLIT_NAMES, counts):
        entries = []
        for label, classname in reversed(list(enumerate(data.CLASSNAMES[name]))):
            for i in range(count):
                relative = f"{classname.replace(' ', '_')}/{part}_{i}.png"
                write_png(base / folder / relative, value=(label * 40, i * 20, 7))
                entries.append([relative, label, classname])
        split[part] = entries
    (base / f"split_{folder}.json").write_text(json.dumps(split))
    return base


def zip_tree(folder, zip_path, prefix=""):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, prefix + file.relative_to(folder).as_posix())
    return zip_path


def items(labels):
    return [Item(f"/x/{i}.png", label, f"class {label}") for i, label in enumerate(labels)]


# ------------------------------------------------------------------ split files and the registry
def test_registry_names_and_classnames_agree():
    assert set(data.MEDICAL) == set(data.CLASSNAMES)
    assert data.MEDICAL["covid"] == "COVID_19" and len(data.MEDICAL) == 11


def test_official_layout_is_read_with_label_order_from_the_file(tmp_path):
    base = make_official(tmp_path)
    splits = data.load_splits("btmri", root=str(tmp_path))
    assert splits.classnames == data.CLASSNAMES["btmri"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 12, 8)
    first = splits.train[0]  # the file lists "normal brain" (label 3) first
    assert first.label == 3 and first.classname == "normal brain"
    assert first.path == str(base / "BTMRI" / "normal_brain" / "train_0.png")
    parts = data.read_split_file(base / "split_BTMRI.json")
    assert parts["test"] == splits.test


@pytest.mark.parametrize("content, problem", [
    ({"train": [], "val": []}, '"train", "val" and "test"'),
    ({"train": [["a.png", "0", "x"]], "val": [], "test": []}, '"train" entry 0'),
    ({"train": [["a.png", 0]], "val": [], "test": []}, '"train" entry 0'),
    ({"train": [["a.png", 0, "x"]], "val": [], "test": [["b.png", 0, "y"]]}, "called both"),
    ({"train": [["a.png", 0, "x"]], "val": [], "test": [["b.png", 2, "y"]]}, "0..n-1"),
    ({"train": [["a.png", 0, "x"]], "val": [], "test": []}, "must not be empty"),
])
def test_split_file_of_the_wrong_format_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError) as error:
        data.read_split_file(path)
    assert str(path) in str(error.value) and "wrong format" in str(error.value)
    assert problem in str(error.value)


def test_split_file_that_is_not_json_names_file(tmp_path):
    base = make_official(tmp_path)
    (base / "split_BTMRI.json").write_text('{"train": [oops')
    with pytest.raises(UserError, match="not valid JSON") as error:
        data.load_splits("btmri", root=str(tmp_path))
    assert str(base / "split_BTMRI.json") in str(error.value)


def test_missing_dataset_mentions_layout_and_download_flag(tmp_path):
    with pytest.raises(UserError) as error:
        data.load_splits("kvasir", root=str(tmp_path))
    message = str(error.value)
    assert "--download" in message and "split_Kvasir.json" in message
    assert str(tmp_path / "Kvasir" / "Kvasir") in message


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError) as error:
        data.load_splits("imagenet")
    assert all(name in str(error.value) for name in [*data.BENCHMARKS, "synthetic"])


def test_missing_image_is_named_before_training(tmp_path):
    base = make_official(tmp_path)
    victim = base / "BTMRI" / "glioma_tumor" / "test_1.png"
    victim.unlink()
    with pytest.raises(UserError) as error:
        data.load_splits("btmri", root=str(tmp_path))
    assert str(victim) in str(error.value)
    with pytest.raises(UserError, match="not found") as error:
        data.ImageDataset([Item(str(victim), 0, "glioma tumor")], data.build_transform(8))[0]
    assert str(victim) in str(error.value)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(UserError, match="cannot read image") as error:
        data.ImageDataset([Item(str(bad), 0, "x")], data.build_transform(8))[0]
    assert str(bad) in str(error.value)


# ------------------------------------------------------------------ few-shot sampling
def dassl_reference(train, val, shots, seed):
    """Dassl's generate_fewshot_dataset on train then val after a global random.seed."""
    random.seed(seed)
    output = []
    for source, k in ((train, shots), (val, min(shots, 4))):
        tracker = defaultdict(list)
        for item in source:
            tracker[item.label].append(item)
        chosen = []
        for group in tracker.values():
            chosen.extend(random.sample(group, k) if len(group) >= k else group)
        output.append(chosen)
    return output


def toy_splits():
    rng = random.Random(0)
    # Labels appear first in the order 2, 0, 1, 3; label 3 has only 3 train items, label 1 exactly 8.
    tail = [2] * 20 + [0] * 15 + [1] * 7 + [3] * 3
    rng.shuffle(tail)
    train_labels = [2, 0, 1] + tail
    train = items(train_labels)
    val = [Item(f"/v/{i}.png", label, f"class {label}") for i, label in enumerate([1, 0, 2, 3] * 6)]
    test = items([0, 1, 2, 3])
    return Splits(train, val, test, [f"class {k}" for k in range(4)], "toy")


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_few_shot_matches_dassl_with_train_then_val_on_one_stream(shots, seed):
    splits = toy_splits()
    sampled = data.few_shot_splits(splits, shots, seed)
    assert [sampled.train, sampled.val] == dassl_reference(splits.train, splits.val, shots, seed)
    assert sampled.test == splits.test and sampled.classnames == splits.classnames


def test_few_shot_seed_rules_and_fewer_than_k_takes_all():
    splits = toy_splits()
    a, b = data.few_shot(splits.train, 4, 1), data.few_shot(splits.train, 4, 1)
    assert a == b and a != data.few_shot(splits.train, 4, 2)
    per_label = defaultdict(list)
    for item in a:
        per_label[item.label].append(item)
    assert {k: len(v) for k, v in per_label.items()} == {2: 4, 0: 4, 1: 4, 3: 3}
    assert per_label[3] == [i for i in splits.train if i.label == 3]  # all, in their order
    assert len(set(a)) == len(a)  # never repeats


def test_more_shots_than_images_warns_once_and_shots_per_class_counts(capsys):
    splits = toy_splits()  # train: class 3 has 3 images, class 1 has 8
    sampled = data.few_shot_splits(splits, 4, 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "4 shots asked" in lines[0] and lines[0].endswith(": class 3 (3)")
    assert data.shots_per_class(sampled) == {"class 0": 4, "class 1": 4, "class 2": 4, "class 3": 3}
    data.few_shot_splits(splits, 16, 1)
    assert capsys.readouterr().err.strip().endswith(": class 1 (8), class 3 (3)")
    data.few_shot_splits(splits, 2, 1)
    assert capsys.readouterr().err == ""
    assert data.shots_per_class(data.subsample_classes(sampled, "novel")) == {"class 2": 4, "class 3": 3}


def test_few_shot_is_pure_and_all_means_everything():
    splits = toy_splits()
    random.seed(123)
    expected = random.random()
    random.seed(123)
    data.few_shot_splits(splits, 2, 5)
    assert random.random() == expected  # the global stream is untouched
    assert data.few_shot(splits.train, 0, 1) == splits.train
    assert data.few_shot_splits(splits, "all", 1) == splits


# ------------------------------------------------------------------ base / novel
@pytest.mark.parametrize("n, n_base", [(5, 3), (4, 2), (3, 2)])
def test_base_and_novel_split_and_relabel(n, n_base):
    labels = list(range(n)) * 3
    splits = Splits(items(labels), items(labels), items(labels), [f"class {k}" for k in range(n)], "t")
    base = data.subsample_classes(splits, "base")
    novel = data.subsample_classes(splits, "novel")
    assert base.classnames == [f"class {k}" for k in range(n_base)]
    assert novel.classnames == [f"class {k}" for k in range(n_base, n)]
    for part in ("train", "val", "test"):
        assert sorted({i.label for i in getattr(base, part)}) == list(range(n_base))
        assert sorted({i.label for i in getattr(novel, part)}) == list(range(n - n_base))
        # each item keeps its class name, so the relabelled label points at its own name
        assert all(novel.classnames[i.label] == i.classname for i in getattr(novel, part))
    assert data.subsample_classes(splits, "all") == splits
    with pytest.raises(UserError, match="base or novel"):
        data.subsample_classes(splits, "new")


# ------------------------------------------------------------------ your own folder
def make_own(folder, counts={"class_a": 10, "class_b": 5, "tiny_c": 2}):
    for name, count in counts.items():
        for i in range(count):
            write_png(folder / name / f"{i}.png")
    (folder / "notes.txt").write_text("not a class")
    return folder


def test_own_folder_gets_a_seeded_stratified_split(tmp_path):
    folder = make_own(tmp_path / "mine")
    splits = data.load_splits(str(folder), split_seed=1)
    assert splits.classnames == ["class a", "class b", "tiny c"] and splits.name == "mine"
    every = splits.train + splits.val + splits.test
    assert len(every) == len(set(every)) == 17
    assert {i.label for i in splits.test} == {0, 1, 2}
    assert {i.label for i in splits.train} == {0, 1, 2}
    counts = [sum(i.label == 0 for i in part) for part in (splits.train, splits.val, splits.test)]
    assert counts == [8, 0, 2]  # 80/20: no image is spent on a validation split that no method reads
    assert data.load_splits(str(folder), split_seed=1) == splits
    assert data.load_splits(str(folder), split_seed=2).test != splits.test
    assert data.load_splits(str(folder)).test == data.load_splits(str(folder), split_seed=0).test  # fixed default


def test_own_folder_uses_its_split_json(tmp_path):
    folder = make_own(tmp_path / "mine")
    split = {"train": [["class_b/0.png", 0, "bee"], ["class_a/0.png", 1, "ay"]], "val": [],
             "test": [["class_a/1.png", 1, "ay"]]}
    (folder / "split.json").write_text(json.dumps(split))
    splits = data.load_splits(str(folder))
    assert splits.classnames == ["bee", "ay"]
    assert splits.train[0] == Item(str(folder / "class_b" / "0.png"), 0, "bee")


def test_own_folder_errors(tmp_path):
    with pytest.raises(UserError, match="at least 2"):
        data.load_splits(str(make_own(tmp_path / "one", {"a": 3, "b": 1})))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        data.load_splits(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        data.load_splits(str(tmp_path / "nowhere"))


def test_two_class_folders_with_one_class_name_are_refused(tmp_path):
    folder = make_own(tmp_path / "mine", {"glioma_tumor": 3, "glioma tumor": 3, "normal": 3})
    with pytest.raises(UserError, match="both give the class name 'glioma tumor'") as error:
        data.load_splits(str(folder))
    assert str(folder / "glioma_tumor") in str(error.value) and str(folder / "glioma tumor") in str(error.value)


def test_files_that_are_not_images_are_named_in_the_account(tmp_path, capsys):
    folder = make_own(tmp_path / "mine", {"class_a": 4, "class_b": 4})
    for name in ("class_a/notes.txt", "class_a/scan.raw", "class_b/labels.csv", "class_b/readme.md"):
        (folder / name).write_text("x")
    (folder / "class_a" / ".DS_Store").write_text("x")  # hidden: silent
    (folder / "class_b" / ".cache").mkdir()
    (folder / "class_b" / ".cache" / "thumb.db").write_text("x")
    splits = data.load_splits(str(folder), show=True)
    assert len(splits.train + splits.val + splits.test) == 8
    out, err = capsys.readouterr()
    assert err == ""
    lines = [line for line in out.splitlines() if "not an image" in line]
    assert lines == ["data: left out 4 file(s), not an image (no image extension, no DICOM content): "
                     "class_a/notes.txt, class_a/scan.raw, class_b/labels.csv, ..."]
    assert "DS_Store" not in out and "thumb" not in out
    left_out = data.data_account(splits)["left_out"]
    assert [(e["path"], e["reason"]) for e in left_out if e["reason"] == "not an image"] == [
        ("class_a/notes.txt", "not an image"), ("class_a/scan.raw", "not an image"),
        ("class_b/labels.csv", "not an image"), ("class_b/readme.md", "not an image")]  # all of them
    make_own(tmp_path / "clean", {"class_a": 4, "class_b": 4})
    data.load_splits(str(tmp_path / "clean"))
    assert capsys.readouterr().err == ""


def test_a_class_without_training_images_is_named(tmp_path):
    folder = make_own(tmp_path / "mine")
    split = {"train": [["class_b/0.png", 0, "bee"]], "val": [["class_a/0.png", 1, "ay"]],
             "test": [["class_a/1.png", 1, "ay"], ["class_b/1.png", 0, "bee"]]}
    (folder / "split.json").write_text(json.dumps(split))
    with pytest.raises(UserError, match="'ay' of .*split.json have no training image"):
        data.load_splits(str(folder))
    # Splits made any other way are checked where the training list is final.
    splits = Splits(items([0, 0, 2]), items([0, 1, 2]), items([0, 1, 2]), ["class 0", "class 1", "class 2"], "t")
    with pytest.raises(UserError, match="'class 1' of dataset t"):
        data.few_shot_splits(splits, 2, 1)
    with pytest.raises(UserError, match="'class 1' of dataset t"):
        data.few_shot_splits(splits, "all", 1)
    with pytest.raises(UserError, match="'class 1' of dataset t"):
        data.subsample_classes(splits, "novel")


# ------------------------------------------------------------------ every image opens before training
def test_unreadable_images_fail_at_load_naming_count_first_and_why(tmp_path):
    folder = make_own(tmp_path / "mine", {"class_a": 5, "class_b": 5})
    (folder / "class_a" / "0.png").write_text("a text file, renamed")
    good = (folder / "class_b" / "3.png").read_bytes()
    (folder / "class_b" / "3.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError) as error:
        data.load_splits(str(folder))
    message = str(error.value)
    assert "\n" not in message and message.startswith("2 of 10 image file(s) of")
    assert str(folder / "class_a" / "0.png") in message and "cannot identify image file" in message
    assert data.image_problem(str(folder / "class_b" / "3.png"))  # the truncated one is caught on its own
    assert data.image_problem(str(folder / "class_b" / "4.png")) is None


def test_truncated_jpeg_and_dicom_are_caught_and_good_ones_pass(tmp_path):
    jpeg = tmp_path / "scan.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    assert data.image_problem(str(jpeg)) is None
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    assert "truncated" in data.image_problem(str(jpeg))
    assert data.image_problem(get_testdata_file("MR_small.dcm")) is None
    assert "truncated" in data.image_problem(get_testdata_file("MR_truncated.dcm"))
    fake = tmp_path / "fake.dcm"
    fake.write_text("not a DICOM file")
    assert "DICM" in data.image_problem(str(fake))
    assert data.image_problem(str(tmp_path / "gone.png")) == "the file does not exist"


def test_a_garbage_benchmark_test_image_fails_at_load(tmp_path):
    base = make_official(tmp_path)
    victim = base / "BTMRI" / "pituitary_tumor" / "test_0.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="1 of 40 image file") as error:
        data.load_splits("btmri", root=str(tmp_path))
    assert str(victim) in str(error.value)


# ------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_sized_and_learnable():
    splits = data.load_splits("synthetic", image_size=32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (128, 32, 160)
    transform = data.build_transform(32)
    dataset = data.ImageDataset(splits.train, transform)
    image, label = dataset[5]
    assert image.shape == (3, 32, 32) and label == 1
    again = data.ImageDataset(data.load_splits("synthetic", image_size=32).train, transform)[5][0]
    assert torch.equal(image, again)
    assert not torch.equal(image, dataset[9][0])  # same class, another item: another image
    # The classes differ visibly: nearest class mean of the colour statistics separates them.
    def features(items):
        x = torch.stack([data.ImageDataset(items, transform)[i][0] for i in range(len(items))])
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)  # (N, 6)
    train_x, test_x = features(splits.train), features(splits.test)
    train_y = torch.tensor([i.label for i in splits.train])
    test_y = torch.tensor([i.label for i in splits.test])
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(4)])  # (4, 6)
    predicted = torch.cdist(test_x, means).argmin(1)
    assert (predicted == test_y).float().mean() > 0.9


# ------------------------------------------------------------------ images and transforms
@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "I;16", "I", "F"])
@pytest.mark.parametrize("train", [False, True])
def test_every_image_mode_gives_three_channels(tmp_path, mode, train):
    if mode in ("I;16", "I", "F"):
        ramp = np.linspace(0, 4000, 20 * 14).reshape(14, 20)
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray(ramp.astype(dtype))
        assert image.mode == mode
        path = tmp_path / "image.tiff"
        image.save(path)
    else:
        path = write_png(tmp_path / "image.png", mode=mode, size=(20, 14))
    x, _ = data.ImageDataset([Item(str(path), 0, "x")], data.build_transform(16, train=train))[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    if mode in ("I;16", "I", "F") and not train:
        # scaled to 8 bits, not clipped: PIL's convert would make nearly every pixel white
        assert (x == 1).float().mean() < 0.2 and x.max() > 0.9


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P"])
def test_test_images_are_never_blank_whatever_their_path(mode):
    """Before its grey pixel, about 1 path in 200 gave an image whose colour and path mark convert
    to one grey: test_every_image_mode_gives_three_channels[L] failed on such temporary paths."""
    paths = [f"/tmp/{'d' * (i % 90)}/pytest-{i}/image.png" for i in range(3000)]  # colours vary with the length
    extrema = {path: data.to_rgb(path_image(path, mode)).getextrema() for path in paths}  # per channel
    assert [path for path, channels in extrema.items() if all(low == high for low, high in channels)] == []


def test_rgba_composites_on_white_unless_wholly_transparent():
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    assert data.to_rgb(rgba).getpixel((0, 0)) == (200, 100, 50)  # alpha 0 everywhere: an export mistake
    rgba.putpixel((1, 1), (200, 100, 50, 255))
    assert data.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert data.to_rgb(Image.new("RGBA", (4, 4), (200, 100, 50, 255))).getpixel((0, 0)) == (200, 100, 50)


def test_build_transform_normalises_only_when_asked():
    image = Image.new("RGB", (30, 20), (255, 0, 128))
    raw = data.build_transform(24)(image)
    assert raw.shape == (3, 24, 24) and raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(raw[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    normed = data.build_transform(24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(image)
    assert torch.allclose(normed, (raw - 0.5) / 0.25)
    names = lambda t: [type(step).__name__ for step in t.transforms]  # noqa: E731
    assert "RandomHorizontalFlip" in names(data.build_transform(24, train=True, hflip=True))
    assert "RandomHorizontalFlip" not in names(data.build_transform(24, train=True))
    assert "RandomResizedCrop" in names(data.build_transform(24, train=True))
    with pytest.raises(ValueError):
        data.build_transform(24, mean=(0.5, 0.5, 0.5))


def test_loaders_are_seeded_and_drop_last_only_with_a_full_batch():
    items = [data.Item(f"synthetic:train:{i}:8", i, str(i)) for i in range(10)]
    dataset = data.ImageDataset(items, lambda image: 0)

    def order(loader):
        return torch.cat([labels for _, labels in loader]).tolist()

    first = order(data.make_loader(dataset, 4, train=True, seed=1))
    assert first == order(data.make_loader(dataset, 4, train=True, seed=1))
    assert first != order(data.make_loader(dataset, 4, train=True, seed=2))
    assert len(first) == 8  # last partial batch dropped
    assert len(order(data.make_loader(dataset, 16, train=True, seed=1))) == 10
    assert order(data.make_loader(dataset, 4, train=False, seed=1)) == list(range(10))


# ------------------------------------------------------------------ download and safe extraction
def evil_zip(path, kind):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("BTMRI/split_BTMRI.json", "{}")
        if kind == "parent":
            archive.writestr("BTMRI/../../evil.txt", "x")
        elif kind == "absolute":
            archive.writestr(zipfile.ZipInfo("/tmp/evil_absolute.txt"), "x")
        elif kind == "symlink":
            link = zipfile.ZipInfo("BTMRI/link")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(link, "/etc/passwd")
    return path


def test_safe_extract_extracts_a_good_zip(tmp_path):
    source = tmp_path / "source"
    write_png(source / "a" / "1.png")
    (source / "notes.txt").write_text("hello")
    data.safe_extract(zip_tree(source, tmp_path / "good.zip"), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "hello"
    assert (tmp_path / "out" / "a" / "1.png").is_file()


@pytest.mark.parametrize("kind, message", [
    ("parent", "outside"), ("absolute", "outside"), ("symlink", "symbolic link")])
def test_safe_extract_refuses_escapes_and_links(tmp_path, kind, message):
    target = tmp_path / "deep" / "out"
    with pytest.raises(UserError, match=message):
        data.safe_extract(evil_zip(tmp_path / "evil.zip", kind), target)
    assert not target.exists() and not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_an_oversized_archive(tmp_path):
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * 10_000)
    with pytest.raises(UserError, match="limit"):
        data.safe_extract(path, tmp_path / "out", max_bytes=5_000)
    assert not (tmp_path / "out").exists()


def fake_hub(monkeypatch, zip_path):
    calls = []

    def hf_hub_download(repo_id, repo_type, filename, **kwargs):
        calls.append((repo_id, repo_type, filename))
        return str(zip_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


@pytest.mark.parametrize("nested", [True, False])
def test_download_end_to_end_through_load_splits(tmp_path, monkeypatch, nested):
    made = make_official(tmp_path / "made")
    zip_path = zip_tree(made.parent if nested else made, tmp_path / "BTMRI.zip")
    calls = fake_hub(monkeypatch, zip_path)
    root = tmp_path / "data"
    splits = data.load_splits("btmri", root=str(root), download=True)
    assert calls == [("TahaKoleilat/BiomedCoOp", "dataset", "BTMRI.zip")]
    assert splits.classnames == data.CLASSNAMES["btmri"] and len(splits.train) == 20
    assert splits.train[0].path.startswith(str(root / "BTMRI" / "BTMRI"))
    assert [p.name for p in root.iterdir()] == ["BTMRI"]  # no scratch folder or lock file left behind
    data.load_splits("btmri", root=str(root), download=True)  # already there: no second download
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["parent", "symlink"])
def test_download_of_a_bad_zip_leaves_no_target(tmp_path, monkeypatch, kind):
    fake_hub(monkeypatch, evil_zip(tmp_path / "evil.zip", kind))
    root = tmp_path / "data"
    with pytest.raises(UserError, match="refusing"):
        data.load_splits("btmri", root=str(root), download=True)
    assert [p.name for p in root.iterdir()] == []


def test_download_of_a_zip_without_split_file_says_so(tmp_path, monkeypatch):
    made = make_official(tmp_path / "made")
    (made / "split_BTMRI.json").unlink()
    fake_hub(monkeypatch, zip_tree(made, tmp_path / "BTMRI.zip"))
    with pytest.raises(UserError, match="has no split_BTMRI.json"):
        data.load_splits("btmri", root=str(tmp_path / "data"), download=True)
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


def _download_in_a_process(root, zip_path, barrier):
    def hf_hub_download(**kwargs):
        try:  # both processes wait here for each other, so without the lock they overlap
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # the other process never downloads: it waits on the lock
        return str(zip_path)
    huggingface_hub.hf_hub_download = hf_hub_download
    data.load_splits("btmri", root=str(root), download=True)


def test_two_processes_downloading_at_once_both_succeed(tmp_path):
    zip_path = zip_tree(make_official(tmp_path / "made"), tmp_path / "BTMRI.zip")
    root = tmp_path / "data"
    context = multiprocessing.get_context("fork")  # inherits the imports: starts in milliseconds
    barrier = context.Barrier(2, timeout=0.5)
    processes = [context.Process(target=_download_in_a_process, args=(root, zip_path, barrier)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert [p.name for p in root.iterdir()] == ["BTMRI"]
    assert len(data.load_splits("btmri", root=str(root)).train) == 20


def test_unreachable_hub_explains_the_manual_route(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("Could not resolve host")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError) as error:
        data.load_splits("busi", root=str(tmp_path), download=True)
    message = str(error.value)
    assert "could not reach the Hugging Face hub" in message and "by hand" in message
    assert str(tmp_path / "BUSI" / "split_BUSI.json") in message


def test_a_failed_download_leaves_no_lock_file(tmp_path, monkeypatch):
    def failing(**kwargs):
        raise RuntimeError("the hub broke")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    for attempt in range(2):  # and the next attempt is not blocked by anything left behind
        with pytest.raises(UserError, match="could not reach the Hugging Face hub"):
            data.load_splits("btmri", root=str(tmp_path / "data"), download=True)
        assert list((tmp_path / "data").iterdir()) == []


# ------------------------------------------------------------------ DICOM
def dicom_copy(tmp_path, name, **changes):
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}_{name}"
    ds.save_as(path)
    return path


def grey(path):
    pixels = np.asarray(data.open_image(str(path)))
    assert pixels.shape[2] == 3 and (pixels == pixels[..., :1]).all()
    return pixels[..., 0].astype(int)


def test_dicom_rescales_then_applies_its_window(tmp_path):
    path = dicom_copy(tmp_path, "CT_small.dcm", WindowCenter=40, WindowWidth=400)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # intercept -1024
    image = grey(path)
    below, above = hu <= 40 - 0.5 - 199.5, hu > 40 - 0.5 + 199.5
    inside = ~below & ~above
    assert below.any() and above.any() and inside.any()
    assert (image[below] == 0).all() and (image[above] == 255).all()
    expected = np.round(((hu[inside] - 39.5) / 399 + 0.5) * 255)
    assert np.abs(image[inside] - expected).max() <= 1


def test_dicom_uses_the_first_of_several_windows(tmp_path):
    first = grey(dicom_copy(tmp_path, "MR_small.dcm", WindowCenter=[600, 100], WindowWidth=[1600, 50]))
    assert (first == grey(dicom_copy(tmp_path, "MR_small.dcm", WindowCenter=600, WindowWidth=1600))).all()
    assert (first != grey(dicom_copy(tmp_path, "MR_small.dcm", WindowCenter=900, WindowWidth=800))).any()


def test_dicom_without_window_is_stretched_min_to_max():
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    image = grey(get_testdata_file("CT_small.dcm"))
    assert image[raw == raw.min()].max() == 0 and image[raw == raw.max()].min() == 255
    order = np.argsort(raw, axis=None)
    assert (np.diff(image.ravel()[order]) >= 0).all()  # monotonic in the stored values


def test_dicom_monochrome1_is_inverted(tmp_path):
    normal = grey(get_testdata_file("MR_small.dcm"))
    inverted = grey(dicom_copy(tmp_path, "MR_small.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert (inverted == 255 - normal).all() and normal.std() > 10


def test_dicom_multi_frame_gives_the_middle_frame():
    frames = pydicom.dcmread(get_testdata_file("rtdose.dcm")).pixel_array.astype(float)  # (15, 10, 10)
    image = grey(get_testdata_file("rtdose.dcm"))

    def distance(frame):
        return np.abs(image - (frame - frame.min()) * 255 / (frame.max() - frame.min())).max()
    assert distance(frames[7]) <= 0.5 and min(distance(f) for i, f in enumerate(frames) if i != 7) > 1


def test_compressed_dicom_without_a_decoder_names_file_and_packages():
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    try:
        pydicom.dcmread(path).pixel_array
        pytest.skip("a JPEG-LS decoder is installed here")
    except RuntimeError:
        pass
    with pytest.raises(UserError) as error:
        data.open_image(path)
    message = str(error.value)
    assert "\n" not in message and path in message and "JPEG-LS" in message
    assert "pylibjpeg" in message and "python-gdcm" in message
    assert data.image_problem(path) == message  # caught before training too


def test_a_folder_of_dicom_files_loads_and_feeds_the_model(tmp_path):
    for i in range(3):
        for name, source in (("mr", "MR_small.dcm"), ("ct", "CT_small.dcm"), ("j2k", "JPEG2000.dcm")):
            (tmp_path / "mine" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(get_testdata_file(source), tmp_path / "mine" / name / f"{i}.dcm")
    splits = data.load_splits(str(tmp_path / "mine"))
    assert splits.classnames == ["ct", "j2k", "mr"] and len(splits.train) == 6
    dataset = data.ImageDataset(splits.train + splits.test, data.build_transform(16))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert x.shape == (len(dataset), 3, 16, 16) and x.amax() > 0.9 and x.amin() < 0.1


# ------------------------------------------------------------------ dataset names
def test_dataset_names_any_case_and_folder_paths_name_the_folder(tmp_path, monkeypatch):
    assert {data.dataset_key(n) for n in ("BUSI", "Busi", "busi")} == {"busi"}
    assert data.dataset_key("Synthetic") == "synthetic" == data.load_splits("Synthetic", image_size=8).name
    make_official(tmp_path / "data", name="busi", counts=(2, 1, 1))
    assert data.load_splits("BUSI", root=str(tmp_path / "data")).name == "busi"
    mine = make_own(tmp_path / "my_folder", {"a": 2, "b": 2})
    monkeypatch.chdir(tmp_path)
    assert data.dataset_key("./my_folder/") == "my_folder" == data.load_splits("./my_folder/").name
    monkeypatch.chdir(mine)
    assert data.dataset_key(".") == "my_folder" == data.load_splits(".").name
    (mine / "prompts.json").write_text(json.dumps(own_text(["a", "b"])))
    assert list(classtext.load_class_text(".", ["a", "b"])["classes"]) == ["a", "b"]
    monkeypatch.setattr(classtext, "PROMPTS_DIR", tmp_path)
    (tmp_path / "busi.json").write_text(json.dumps(own_text(data.CLASSNAMES["busi"])))
    assert list(classtext.load_class_text("Busi", data.CLASSNAMES["busi"])["classes"]) == data.CLASSNAMES["busi"]
    assert list(classtext.load_class_text("SYNTHETIC", ["red disc"])["classes"]) == ["red disc"]


# ------------------------------------------------------------------ class text
def test_synthetic_class_text_is_restricted_and_ordered():
    names = ["yellow checkered patch", "red disc"]
    text = classtext.load_class_text("synthetic", names)
    assert list(text["classes"]) == names
    assert text["template"].format("red disc") == "a photo of a red disc."
    assert set(text["classes"]["red disc"]) == {"descriptions", "distinctive", "confusions"}


def own_text(classes):
    entry = {"descriptions": [f"sentence number {i} about this class" for i in range(20)],
             "distinctive": [f"distinctive sentence number {i} here" for i in range(5)],
             "confusions": [" ".join(["word"] * 20 + [str(i)]) for i in range(5)]}
    return {"template": "a photo of a {}.", "ctx_init": "a photo of a", "classes": {c: entry for c in classes}}


def test_own_folder_class_text_lists_missing_classes(tmp_path):
    folder = make_own(tmp_path / "mine")
    with pytest.raises(UserError, match="needs class text") as error:
        classtext.load_class_text(str(folder), ["class a"])
    assert str(folder / "prompts.json") in str(error.value)
    (folder / "prompts.json").write_text(json.dumps(own_text(["class a"])))
    with pytest.raises(UserError) as error:
        classtext.load_class_text(str(folder), ["class a", "class b", "tiny c"])
    assert "class b, tiny c" in str(error.value) and "class a," not in str(error.value)
    assert list(classtext.load_class_text(str(folder), ["class a"])["classes"]) == ["class a"]


def test_benchmark_class_text_comes_from_prompts_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(classtext, "PROMPTS_DIR", tmp_path)
    (tmp_path / "busi.json").write_text(json.dumps(own_text(["benign tumor", "normal scan"])))
    with pytest.raises(UserError) as error:
        classtext.load_class_text("busi", data.CLASSNAMES["busi"])
    assert "malignant tumor" in str(error.value) and "busi.json" in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        classtext.load_class_text("retina", data.CLASSNAMES["retina"])


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(template="a photo of a {} {}."), "exactly one"),
    (lambda t: t.update(ctx_init="an image of"), "must start with"),
    (lambda t: t["classes"]["x"].update(descriptions=[]), '"descriptions" is empty'),
    (lambda t: t["classes"]["x"].update(distinctive=["fine sentence", ""] * 3), "non-empty strings"),
    (lambda t: t.pop("classes"), '"classes"'),
])
def test_validate_class_text_rejects_each_problem(change, message):
    text = json.loads(json.dumps(own_text(["x"])))
    classtext.validate_class_text(text, "mine.json")
    change(text)
    with pytest.raises(UserError, match=message) as error:
        classtext.validate_class_text(text, "mine.json")
    assert "mine.json" in str(error.value)


def test_dicom_without_the_file_preamble_is_read(tmp_path):
    """Older DICOM files hold only the data set (no preamble, no 'DICM', no file meta): read them in
    the standard's default encoding; a DICOM file without pixel data is named as such."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    (tmp_path / "bare.dcm").write_bytes(body.getvalue())
    bare, full = data.open_image(tmp_path / "bare.dcm"), data.open_image(get_testdata_file("CT_small.dcm"))
    assert np.array_equal(np.asarray(bare), np.asarray(full))
    with pytest.raises(UserError, match="holds no image"):
        data.open_image(get_testdata_file("rtplan.dcm"))
    with pytest.raises(UserError, match="is not a DICOM file"):  # neither preamble nor a data set at its start
        data.open_image(get_testdata_file("no_meta.dcm"))
