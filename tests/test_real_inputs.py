"""Real-world inputs (issue 18): images as a viewer shows them (EXIF orientation, transparency, 16-bit
and float range, elongated and huge images, blank ones), DICOM through pydicom's display functions and
found by content, and folders (symbolic links, listing order, split leakage, odd and decomposed names)."""
import csv
import hashlib
import io
import json
import os
import shutil
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import classtext
import data
import runner
from test_data import dicom_copy  # a pydicom test file saved with some elements changed
from common import UserError


def noise_image(size=(40, 24), seed=0, mode="RGB"):
    """An image with no symmetry, so a turned copy is told apart."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write(path, image, **save):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def own_folder(root, counts, size=(16, 12)):
    """Class folders of distinct noise PNGs: {class folder name: count}."""
    for name, count in counts.items():
        for i in range(count):
            write(root / name / f"{i}.png", noise_image(size, seed=zlib.crc32(f"{name}{i}".encode())))
    return root


def grey_values(image):
    return np.asarray(image, dtype=int)[..., 0]


# ------------------------------------------------------------------ EXIF orientation
@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                                 (3, Image.Transpose.ROTATE_180)])
def test_a_sideways_jpeg_with_an_orientation_tag_loads_upright(tmp_path, orientation, stored):
    upright = noise_image()
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = orientation
    plain = write(tmp_path / "upright.jpg", upright, quality=95)
    turned = write(tmp_path / "turned.jpg", upright.transpose(stored), quality=95, exif=exif.tobytes())
    a, b = np.asarray(data.open_image(plain), float), np.asarray(data.open_image(turned), float)
    assert a.shape == b.shape == (24, 40, 3) and np.abs(a - b).mean() < 3
    # the check before training and the 1/8-scale decode it uses see the same upright image
    assert data.image_problem(str(turned)) is None
    x, _ = data.ImageDataset([data.Item(str(turned), 0, "x")], data.build_transform(16))[0]
    y, _ = data.ImageDataset([data.Item(str(plain), 0, "x")], data.build_transform(16))[0]
    assert (x - y).abs().mean() < 0.02


# ------------------------------------------------------------------ transparency and blank images
def test_transparency_is_composited_onto_white_and_wholly_transparent_shows_its_colour():
    colour = noise_image((8, 6)).convert("RGBA")
    half = colour.copy()
    half.putalpha(128)
    shown = np.asarray(data.to_rgb(half), float)
    expected = np.asarray(colour.convert("RGB"), float) * 128 / 255 + 255 * 127 / 255
    assert np.abs(shown - expected).max() <= 1
    hidden = colour.copy()
    hidden.putalpha(0)  # alpha 0 everywhere: the colour is what was meant
    assert np.array_equal(np.asarray(data.to_rgb(hidden)), np.asarray(colour.convert("RGB")))
    grey = Image.new("LA", (4, 4), (30, 255))
    grey.putpixel((0, 0), (30, 0))
    shown = data.to_rgb(grey)
    assert shown.getpixel((0, 0)) == (255, 255, 255) and shown.getpixel((1, 1)) == (30, 30, 30)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0
    assert data.to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert data.to_rgb(palette).getpixel((1, 1)) == (200, 0, 0)


def test_blank_images_are_refused_in_one_line_naming_count_and_first(tmp_path):
    folder = own_folder(tmp_path / "mine", {"a": 4, "b": 4})
    write(folder / "a" / "0.png", Image.new("RGB", (9, 9), (7, 7, 7)))
    clear = Image.new("RGBA", (9, 9), (50, 60, 70, 0))
    write(folder / "b" / "1.png", clear)  # wholly transparent and of one colour
    nan = np.full((6, 6), np.nan, dtype=np.float32)
    write(folder / "b" / "2.tif", Image.fromarray(nan))
    with pytest.raises(UserError) as error:
        data.load_splits(str(folder))
    message = str(error.value)
    assert "\n" not in message and message.startswith("3 of 9 image file(s) of")
    assert "blank after conversion" in message and str(folder / "a" / "0.png") in message
    with pytest.raises(data.BlankImage):
        data.open_image(folder / "b" / "2.tif")  # the loader refuses what the check refuses


# ------------------------------------------------------------------ value range
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_wide_images_map_their_finite_range_to_0_255(tmp_path, dtype):
    values = np.linspace(1000, 1010, 6 * 8).reshape(6, 8)
    if dtype == np.int32:
        values = values - 5000  # negative values of a 32-bit image
    values = values.astype(dtype)
    if dtype == np.float32:
        values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, -np.inf
    path = write(tmp_path / "wide.tif", Image.fromarray(values))
    shown = grey_values(data.open_image(path))
    finite = np.isfinite(values.astype(float))
    low, high = values[finite].astype(float).min(), values[finite].astype(float).max()
    expected = np.round((values.astype(float) - low) * 255 / (high - low))
    assert np.abs(shown[finite] - expected[finite]).max() <= 1
    assert shown[finite].min() == 0 and shown[finite].max() == 255
    if dtype == np.float32:
        assert shown[0, 0] == 0 and shown[0, 1] == 255 and shown[0, 2] == 0


def test_a_float_image_without_a_finite_value_is_named(tmp_path):
    path = write(tmp_path / "void.tif", Image.fromarray(np.full((5, 5), np.inf, dtype=np.float32)))
    with pytest.raises(UserError, match="blank") as error:
        data.open_image(path)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------ elongated and huge images
def test_an_extremely_elongated_image_is_refused_fast_with_its_size(tmp_path):
    strip = write(tmp_path / "strip.png", Image.fromarray(np.arange(12000, dtype=np.uint8)[None] % 251))
    start = time.perf_counter()
    with pytest.raises(UserError) as error:
        data.open_image(strip)
    assert time.perf_counter() - start < 0.5
    message = str(error.value)
    assert "\n" not in message and str(strip) in message and "12000x1" in message and "20:1" in message
    assert "12000x1" in data.image_problem(str(strip))  # refused before training
    fine = write(tmp_path / "fine.png", noise_image((200, 10)))  # 20:1 is still read
    assert data.open_image(fine).size == (200, 10)


def test_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    path = write(tmp_path / "big.png", noise_image((100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels: over twice the limit
    with pytest.raises(UserError) as error:
        data.open_image(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and "shrink" in str(error.value)


# ------------------------------------------------------------------ DICOM
def pydicom_files():
    """The DICOM files pydicom ships (its own test_files, and pydicom-data's when installed); the
    others there (README, JSON, dumps) are no DICOM. get_testdata_files('*') would download the rest."""
    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import pydicom_data  # optional: more test files
        folders.append(Path(pydicom_data.__file__).parent / "data")
    except ImportError:
        pass
    # Larger files are left out to keep this test fast (none of pydicom's own is larger).
    return [p for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file() and p.stat().st_size < 4_000_000]


def test_every_dicom_file_pydicom_ships_is_read_or_refused_in_one_line():
    start, read, refused = time.perf_counter(), 0, 0
    for path in pydicom_files():
        if not data.is_dicom(path):
            assert path.suffix.lower() != ".dcm" or "no_meta" in path.name, path
            continue
        try:
            image = data.open_image(path)
        except UserError as error:
            message = str(error)
            assert "\n" not in message and str(path) in message
            assert data.image_problem(str(path)) == message  # the check refuses exactly what the loader does
            if "decode" in message:
                assert "pylibjpeg" in message and "python-gdcm" in message
            refused += 1
            continue
        assert image.mode == "RGB" and min(image.size) >= 1
        assert data.image_problem(str(path)) is None
        read += 1
    assert read >= 60 and refused >= 10
    assert time.perf_counter() - start < 15


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    raw = ds.pixel_array.astype(int)
    item = pydicom.Dataset()
    first, count = int(raw.min()), int(raw.max() - raw.min() + 1)
    table = (np.sqrt(np.arange(count) / (count - 1)) * 4095).astype(np.uint16)  # a gamma the window cannot give
    item.LUTDescriptor, item.LUTData = [count, first, 16], table.astype("<u2").tobytes()
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 600, 1600  # the LUT wins, as in a viewer
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    shown = grey_values(data.open_image(path))
    expected = np.round((table[raw - first] - table.min()) / (table.max() - table.min()) * 255)
    assert np.abs(shown - expected).max() <= 1


def test_dicom_sigmoid_window_follows_its_function(tmp_path):
    path = dicom_copy(tmp_path, "MR_small.dcm", WindowCenter=600, WindowWidth=400, VOILUTFunction="SIGMOID")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(float)
    expected = np.round(255 / (1 + np.exp(-4 * (raw - 600) / 400)))
    assert np.abs(grey_values(data.open_image(path)) - expected).max() <= 1


def test_dicom_palette_and_ybr_colour_are_shown_in_colour(tmp_path):
    palette = np.asarray(data.open_image(get_testdata_file("examples_palette.dcm")), int)
    assert (palette[..., 0] != palette[..., 2]).mean() > 0.1  # colour, not grey
    from pydicom.pixels import convert_color_space
    ds = pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm"))
    rgb = ds.pixel_array
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint8).tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    ybr = io.BytesIO()
    ds.save_as(ybr)
    ybr.seek(0)
    path = tmp_path / "ybr.dcm"
    path.write_bytes(ybr.getvalue())
    assert np.abs(np.asarray(data.open_image(path), float) - rgb).max() <= 2  # the same picture, converted


def test_dicom_per_frame_window_of_an_enhanced_file_is_used(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    raw = ds.pixel_array.astype(float)
    voi = pydicom.Dataset()
    voi.WindowCenter, voi.WindowWidth = 600, 400
    group = pydicom.Dataset()
    group.FrameVOILUTSequence = pydicom.Sequence([voi])
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([group])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    inside = (raw > 420) & (raw < 780)
    expected = np.round(((raw - 599.5) / 399 + 0.5) * 255)
    assert np.abs(grey_values(data.open_image(path))[inside] - expected[inside]).max() <= 1


def bare_dicom_bytes(name="CT_small.dcm"):
    """The data set alone: no preamble, no 'DICM', no file meta (older files, CDs)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    return body.getvalue()


def test_dicom_files_without_dcm_name_are_found_by_content(tmp_path, monkeypatch):
    folder = own_folder(tmp_path / "mine", {"png": 3})
    for i, name in enumerate(["IM000001", "scan.dicom", "1.2.840.113619.2.55.3"]):
        shutil.copy(get_testdata_file("MR_small.dcm"), write_dir(folder / "dcm") / name)
    (folder / "dcm" / "IM000002").write_bytes(bare_dicom_bytes())
    (folder / "dcm" / "notes").write_text("not an image, no extension")
    shutil.copy(Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "DICOMDIR", folder / "dcm")
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", spy)
    found = data.find_images([folder])
    monkeypatch.undo()
    assert not [p for p in opened if p.endswith(".png")]  # a known extension is never sniffed
    names = sorted(p.name for p in found)
    assert names == sorted(["0.png", "1.png", "2.png", "IM000001", "IM000002", "scan.dicom",
                            "1.2.840.113619.2.55.3"])
    splits = data.load_splits(str(folder))
    assert splits.classnames == ["dcm", "png"] and len(splits.train + splits.val + splits.test) == 7
    bare = np.asarray(data.open_image(folder / "dcm" / "IM000002"))
    assert np.array_equal(bare, np.asarray(data.open_image(get_testdata_file("CT_small.dcm"))))


def write_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ folders
def test_symlinked_folders_are_followed_once_and_cycles_end(tmp_path):
    outside = own_folder(tmp_path / "elsewhere", {"more": 3})
    folder = own_folder(tmp_path / "mine", {"a": 2, "b": 3})
    (folder / "a" / "linked").symlink_to(outside / "more", target_is_directory=True)
    (folder / "a" / "loop").symlink_to(folder / "a", target_is_directory=True)  # a cycle
    (folder / "b" / "again").symlink_to(folder / "b", target_is_directory=True)
    splits = data.load_splits(str(folder))
    counts = data.shots_per_class(splits)  # training images only
    every = splits.train + splits.val + splits.test
    assert sum(i.label == 0 for i in every) == 5 and sum(i.label == 1 for i in every) == 3
    assert len({os.path.realpath(i.path) for i in every}) == len(every) and sum(counts.values()) > 0
    assert len(data.find_images([folder / "a"])) == 5


def test_the_split_does_not_depend_on_listing_order(tmp_path, monkeypatch):
    folder = own_folder(tmp_path / "mine", {"a": 7, "b": 6, "c": 5})
    (folder / "a" / "sub").mkdir()
    for i in range(4):
        write(folder / "a" / "sub" / f"{i}.png", noise_image((8, 8), seed=100 + i))
    before = data.load_splits(str(folder), split_seed=3)
    real_scandir, real_listdir, real_iterdir = os.scandir, os.listdir, Path.iterdir

    class Reversed:
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = list(entries)[::-1]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            if not self.entries:
                raise StopIteration
            return self.entries.pop(0)

        def close(self):
            pass
    monkeypatch.setattr(os, "scandir", Reversed)
    monkeypatch.setattr(os, "listdir", lambda path=".": real_listdir(path)[::-1])
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(list(real_iterdir(self))[::-1]))
    after = data.load_splits(str(folder), split_seed=3)
    assert after == before


def write_split(folder, parts):
    (folder / "split.json").write_text(json.dumps(parts))


def test_a_split_file_listing_one_image_in_two_splits_is_refused(tmp_path):
    folder = own_folder(tmp_path / "mine", {"a": 2, "b": 2})
    write_split(folder, {"train": [["a/0.png", 0, "a"], ["b/0.png", 1, "b"]], "val": [],
                         "test": [["b/1.png", 1, "b"], ["./a/../a/0.png", 0, "a"]]})
    with pytest.raises(UserError) as error:
        data.load_splits(str(folder))
    message = str(error.value)
    assert "\n" not in message and "a/../a/0.png" in message and '"train" and "test"' in message


def test_identical_bytes_in_train_and_test_are_warned_and_only_same_sizes_hashed(tmp_path, monkeypatch, capsys):
    folder = own_folder(tmp_path / "mine", {"a": 3, "b": 3}, size=(10, 10))
    write(folder / "b" / "big.png", noise_image((30, 30), seed=9))  # a size no other file has
    shutil.copy(folder / "a" / "0.png", folder / "b" / "copy_of_a0.png")
    shutil.copy(folder / "a" / "1.png", folder / "b" / "copy_of_a1.png")
    write_split(folder, {"train": [["a/0.png", 0, "a"], ["a/1.png", 0, "a"], ["b/0.png", 1, "b"],
                                   ["b/big.png", 1, "b"]],
                         "val": [], "test": [["b/copy_of_a0.png", 1, "b"], ["b/copy_of_a1.png", 1, "b"],
                                             ["a/2.png", 0, "a"], ["b/1.png", 1, "b"]]})
    hashed = []
    real = hashlib.file_digest

    def counting(f, digest):
        hashed.append(f.name)
        return real(f, digest)
    monkeypatch.setattr(hashlib, "file_digest", counting)
    data.load_splits(str(folder))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(lines) == 1 and "2 test image(s)" in lines[0] and "copy_of_a0.png" in lines[0]
    sizes = {os.path.getsize(folder / "b" / "big.png")}
    assert not [name for name in hashed if os.path.getsize(name) in sizes]  # a lone size is never hashed


# ------------------------------------------------------------------ names
@dataclass
class PredictArgs:
    predict: list = field(default_factory=list)
    predictions: str = ""
    device: str = "cpu"


class MeanColour(torch.nn.Module):
    def forward(self, x):  # (B, 3, H, W) -> two logits
        m = x.mean((1, 2, 3))
        return {"logits": torch.stack([m, -m], 1)}


def predictor(run_dir, device="cpu"):
    return runner.Predictor(MeanColour(), data.build_transform(16), ["light", "dark"], device)


def test_a_file_name_that_is_not_utf8_is_predicted_and_written(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    odd = os.fsdecode(os.fsencode(str(images)) + b"/scan_\xff.png")
    noise_image((12, 12)).save(odd)
    target = tmp_path / "out.csv"
    rows = runner.predict_cli(PredictArgs([str(tmp_path), str(images)], str(target)), predictor)
    assert len(rows) == 1 and rows[0]["path"].endswith("scan_\\xff.png")
    with open(target, encoding="utf-8") as f:
        assert next(csv.DictReader(f))["path"].endswith("scan_\\xff.png")
    assert "scan_\\xff.png" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_no_tmp_file(tmp_path, monkeypatch):
    images = own_folder(tmp_path / "images", {"x": 2})

    def broken(self, rows):
        raise OSError("disk full")
    monkeypatch.setattr(csv.DictWriter, "writerows", broken)
    with pytest.raises(runner.WriteFailed, match="out.csv: disk full"):  # one line, not a traceback
        runner.predict_cli(PredictArgs([str(tmp_path), str(images)], str(tmp_path / "out.csv")), predictor)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no rename")))
    with pytest.raises(runner.WriteFailed, match="m.json: no rename"):
        runner.atomic_write_text(tmp_path / "m.json", "{}")
    with pytest.raises(runner.WriteFailed, match="c.pt: no rename"):
        runner.save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(1)})
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "out.csv").exists()


def test_odd_class_folder_and_file_names_load(tmp_path):
    folder = own_folder(tmp_path / "mine", {"a": 2})
    odd_dir = os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9")
    os.mkdir(odd_dir)
    for i in range(2):
        noise_image((9, 9), seed=40 + i).save(os.fsdecode(os.fsencode(odd_dir) + b"/x\xff%d.png" % i))
    splits = data.load_splits(str(folder))
    assert splits.classnames == ["a", "caf\\xe9"]
    for name in splits.classnames:
        name.encode("utf-8")  # prints and writes as text
    every = splits.train + splits.val + splits.test
    assert all(os.path.isfile(item.path) for item in every) and len(every) == 4


def test_class_names_are_one_unicode_spelling_everywhere(tmp_path):
    composed, decomposed = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    assert composed != decomposed
    folder = own_folder(tmp_path / "mine", {decomposed: 2, "tea": 2})
    splits = data.load_splits(str(folder))
    assert splits.classnames == [composed, "tea"]
    text = data.synthetic_class_text()
    entry = next(iter(text["classes"].values()))
    text["classes"] = {decomposed: entry, "tea": entry}
    (folder / "prompts.json").write_text(json.dumps(text))
    assert list(classtext.load_class_text(str(folder), splits.classnames)["classes"]) == [composed, "tea"]
    write_split(folder, {"train": [[f"{decomposed}/0.png", 0, decomposed], ["tea/0.png", 1, "tea"]], "val": [],
                         "test": [[f"{decomposed}/1.png", 0, composed], ["tea/1.png", 1, "tea"]]})
    assert data.load_splits(str(folder)).classnames == [composed, "tea"]  # one class, two spellings
    (folder / "split.json").unlink()
    own_folder(folder, {composed: 2})
    with pytest.raises(UserError, match="both give the class name"):
        data.load_splits(str(folder))
