"""Folders as users have them: the account of what was read, split folders, a folder named like a
benchmark, --out inside the dataset, volumes, base-to-novel on few classes, an interrupted or
damaged download, a bounded confusion.png, and the messages that used to mislead."""
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import biomedap
import classtext
import data
import runner
import zeroshot
from common import UserError
from data import Item, Splits
from test_data import fake_hub, make_official, write_png, zip_tree

REPO = Path(__file__).resolve().parents[1]


def class_folders(folder, counts):
    for name, count in counts.items():
        for i in range(count):
            write_png(folder / name / f"{i}.png")
    return folder


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------ the account of what was read
def test_the_account_names_layout_counts_and_every_file_left_out_with_its_reason(tmp_path, capsys):
    folder = class_folders(tmp_path / "scans", {"glioma": 6, "normal": 5})
    (folder / "glioma" / "notes.txt").write_text("x")
    (folder / "normal" / "copy.png").symlink_to(folder / "normal" / "0.png")  # one file reached twice
    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 256, (16, 16), np.uint8)) for _ in range(5)]
    pages[0].save(folder / "glioma" / "volume.tif", save_all=True, append_images=pages[1:])
    rtdose = get_testdata_file("rtdose.dcm")  # 15 frames
    (folder / "normal" / "cine.dcm").write_bytes(Path(rtdose).read_bytes())
    (folder / "labels.csv").write_text("x")
    splits = data.load_splits(str(folder), show=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"data: your folder {folder}, one sub-folder per class, split 80/20 train/test per class "
                      "with split seed 0 (the same test set for every run)")
    assert out[1] == "data: 2 classes: glioma, normal"
    # glioma: 6 PNGs and the TIFF; normal: 5 PNGs and the DICOM (the link is the same file); 20% test
    assert out[2:4] == ["data: train 11 images: glioma 6, normal 5", "data: test 2 images: glioma 1, normal 1"]
    account = data.data_account(splits)
    assert account["images"] == {"train": {"glioma": 6, "normal": 5}, "val": {"glioma": 0, "normal": 0},
                                 "test": {"glioma": 1, "normal": 1}}
    reasons = {(e["path"], e["reason"], e.get("detail")) for e in account["left_out"]}
    assert reasons == {("glioma/notes.txt", "not an image", None),
                       ("normal/copy.png", "duplicate", f"the same file as {folder / 'normal' / '0.png'}"),
                       ("glioma/volume.tif", "other frames", "frame 3 of 5 is read, the middle one"),
                       ("normal/cine.dcm", "other frames", "frame 8 of 15 is read, the middle one"),
                       ("labels.csv", "not in a class folder", None)}
    said = "\n".join(out)
    for reason in ("not an image", "a second copy of a file already read", "a volume's other frames",
                   "not in a class folder"):
        assert said.count(reason) == 1  # one line per reason
    assert "glioma/volume.tif (frame 3 of 5 is read, the middle one)" in said


def test_a_multi_page_tiff_gives_its_middle_page_and_says_so(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), 30 * i, np.uint8)) for i in range(1, 6)]
    for page in pages:
        page.putpixel((0, 0), 0)  # not blank
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    image = data.open_image(tmp_path / "stack.tif")
    assert image.getpixel((4, 4)) == (90, 90, 90) and image.info["frame"] == (3, 5)  # the third of five
    pages[0].save(tmp_path / "single.tif")
    assert "frame" not in data.open_image(tmp_path / "single.tif").info


def test_a_tiffs_reduced_resolution_pages_are_not_frames():
    class Tiff:  # pages 0, 2, 3 full size; 1 and 4 thumbnails (NewSubfileType bit 0)
        format, n_frames, page = "TIFF", 5, 0

        def seek(self, page):
            self.page = page

        @property
        def tag_v2(self):
            return {254: 1 if self.page in (1, 4) else 0}
    tiff = Tiff()
    assert data._seek_middle_frame(tiff) == (2, 3) and tiff.page == 2


@pytest.mark.parametrize("name", ["biomedap", "zeroshot"])
def test_runs_print_the_account_before_training_and_keep_it_in_metrics_json(name, tmp_path, capsys, backbones,
                                                                            monkeypatch):
    import common
    monkeypatch.setattr(common, "load_backbone", lambda backbone, device: backbones("tiny"))
    folder = class_folders(tmp_path / "scans", {"glioma": 5, "normal": 5})
    (folder / "glioma" / "notes.txt").write_text("x")
    classtext.write_prompts_starter(folder)
    text = json.loads((folder / "prompts.json").read_text())
    for classname, entry in text["classes"].items():
        entry["descriptions"] = [f"a scan of the brain showing {classname}, with a bright region in the middle."]
    (folder / "prompts.json").write_text(json.dumps(text))
    if name == "zeroshot":
        zeroshot.main(zeroshot.Args(dataset=str(folder), backbone="tiny", device="cpu", out=str(tmp_path / "runs"),
                                    workers=0))
    else:
        runner.run(biomedap, runner.cli_args(biomedap)(dataset=str(folder), backbone="tiny", device="cpu", out=str(tmp_path / "runs"),
                                    workers=0, shots=2, epochs=1, batch_size=2))
    out = capsys.readouterr().out
    assert out.startswith(f"data: your folder {folder}, one sub-folder per class")
    assert "data: test 2 images: glioma 1, normal 1" in out
    last = out.splitlines()[-1]  # the result line says on how many test images
    assert (" n 2 -> " in last) if name == "biomedap" else last.startswith("zero-shot scans (tiny, 2 test images): ")
    record = json.loads(next((tmp_path / "runs").rglob("metrics.json")).read_text())
    assert record["data"]["left_out"] == [{"path": "glioma/notes.txt", "reason": "not an image"}]
    assert record["data"]["images"]["test"] == {"glioma": 1, "normal": 1}


def test_repeated_warnings_are_one_line_each_however_many_classes(backbones, capsys):
    names = [f"class number {i}" for i in range(40)]
    text = {"template": "a photo of a {}.", "classes": {n: {"descriptions": ["a photo."], "distinctive": ["x y."],
                                                              "confusions": ["short."]} for n in names}}
    warnings = classtext.validate_class_text(text, "mine.json", "biomedvr", names)
    assert len(warnings) == 4 and all("\n" not in w and len(w) < 600 and w.endswith(", ...") for w in warnings)
    labels = [i % 40 for i in range(80)]
    splits = Splits([Item(f"/x/{i}.png", label, names[label]) for i, label in enumerate(labels)], [], [], names, "big")
    data.few_shot_splits(splits, 4, 1)
    long = {"template": "a photo of a {}.", "classes": {n: {"descriptions": [n + " word" * 300], "distinctive": [],
                                                              "confusions": []} for n in names}}
    classtext.check_text_fits(backbones("tiny"), long, names, ("descriptions",))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") and line.endswith(", ...") for line in err)


def test_the_synthetic_text_warns_of_nothing(backbones, capsys):
    text = data.synthetic_class_text()
    names = list(text["classes"])
    for method in classtext.CLASS_TEXT_NEEDS:
        assert classtext.validate_class_text(text, "synthetic", method, names) == []
        for backbone in ("tiny", "tiny-clip"):
            classtext.check_text_fits(backbones(backbone), text, names, classtext.CLASS_TEXT_ENCODES[method])
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ train/ val/ test/ folders
def test_split_folders_are_read_as_splits_whatever_their_case(tmp_path, capsys):
    for split, n in (("Training", 4), ("VALID", 2), ("testing", 3)):
        class_folders(tmp_path / "kaggle" / split, {"benign": n, "malignant": n})
    splits = data.load_splits(str(tmp_path / "kaggle"), show=True)
    assert splits.classnames == ["benign", "malignant"]  # not ["testing", "training", "valid"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 6)
    assert all("/Training/" in i.path for i in splits.train) and all("/testing/" in i.path for i in splits.test)
    assert "in split folders (Training/, VALID/, testing/)" in capsys.readouterr().out.splitlines()[0]
    assert data.folder_classnames(tmp_path / "kaggle") == ["benign", "malignant"]


@pytest.mark.parametrize("layout, message", [
    ({"train": ["a", "b"], "test": ["a", "c"]}, "differ (only in train/: b; only in test/: c)"),
    ({"train": ["a", "b"], "val": ["a", "b"]}, "no test/: a split layout needs train/ and test/"),
    ({"train": ["a", "b"], "test": ["a", "b"], "extra": ["x"]}, "and other folders (extra/)"),
    ({"train": ["a", "b"], "Train": ["a", "b"], "test": ["a", "b"]}, "are both the train split"),
])
def test_split_folders_that_do_not_fit_are_one_line(tmp_path, layout, message):
    for split, classes in layout.items():
        class_folders(tmp_path / "set" / split, dict.fromkeys(classes, 2))
    with pytest.raises(UserError) as error:
        data.load_splits(str(tmp_path / "set"))
    assert message in one_line(error)
    if "val" in layout:
        assert "rename val/ to test/" in str(error.value)


# ------------------------------------------------------------------ base-to-novel on few classes
def test_base_to_novel_refuses_two_classes_and_warns_once_on_three(capsys):
    def splits(n):
        labels = list(range(n)) * 2
        items = [Item(f"/x/{i}.png", label, f"c{label}") for i, label in enumerate(labels)]
        return Splits(items, [], items, [f"c{k}" for k in range(n)], "mine")
    for subsample in ("base", "novel"):
        with pytest.raises(UserError, match="base-to-novel needs at least 3 classes, and mine has 2") as error:
            data.subsample_classes(splits(2), subsample)
        one_line(error)
    three = splits(3)
    data.subsample_classes(three, "base")
    assert capsys.readouterr().err == ""
    assert data.subsample_classes(three, "novel").classnames == ["c2"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: mine has 3 classes, so its novel half is one class (c2)")
    data.subsample_classes(splits(4), "novel")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ --out inside the dataset
def test_out_inside_the_dataset_is_refused_before_anything_loads(tmp_path, monkeypatch):
    folder = class_folders(tmp_path / "scans", {"a": 3, "b": 3})
    monkeypatch.chdir(folder)
    monkeypatch.setattr("common.load_backbone", lambda *a: pytest.fail("loaded a backbone"))
    for main, args in ((zeroshot.main, zeroshot.Args(dataset=".")),  # the default --out runs
                       (lambda a: runner.run(biomedap, a), runner.cli_args(biomedap)(dataset=".", out="sub/runs"))):
        with pytest.raises(UserError, match=f"is inside the dataset folder {folder}") as error:
            main(args)
        assert f"--out {tmp_path / 'runs'}" in one_line(error)
    data.check_out_folder(".", str(tmp_path / "runs"))  # beside it: fine
    data.check_out_folder("btmri", "runs")              # a benchmark is read by its split file


def test_run_folders_are_never_read_as_images(tmp_path, capsys):
    folder = class_folders(tmp_path / "scans", {"a": 3, "b": 3})
    run = folder / "runs" / "biomedap" / "scans" / "4shot" / "seed1"
    write_png(run / "confusion.png")
    (run / "metrics.json").write_text("{}")
    write_png(folder / "runs" / "fewshot.png")  # report.py's picture beside the runs
    splits = data.load_splits(str(folder), show=True)
    assert splits.classnames == ["a", "b"]  # not "runs"
    assert not any("confusion" in i.path or "fewshot" in i.path for i in splits.train + splits.test)
    assert ("data: left out 1 file(s), a folder of runs (metrics.json or checkpoint.pt below it), never read as "
            "images: runs (1 run(s) below it)") in capsys.readouterr().out
    with pytest.raises(UserError, match="no image files"):
        data.find_images([str(run)])


# ------------------------------------------------------------------ a folder named like a benchmark
def test_a_folder_named_like_a_benchmark_is_told_apart(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    make_official(root)
    monkeypatch.chdir(tmp_path)
    class_folders(tmp_path / "btmri", {"x": 3, "y": 3})
    benchmark = data.load_splits("btmri", root=str(root), show=True)
    assert benchmark.classnames == data.CLASSNAMES["btmri"]
    assert (f"data: --dataset btmri is the benchmark btmri, not your folder {tmp_path / 'btmri'}: a bare name means "
            "the benchmark; --dataset ./btmri reads the folder") in capsys.readouterr().out
    folder = data.load_splits("./btmri", root=str(root), show=True)
    assert folder.classnames == ["x", "y"] and folder.name == "btmri_folder"
    assert (f"data: your folder {tmp_path / 'btmri'}, not the benchmark btmri (a bare name means the benchmark); its "
            "runs go to btmri_folder/") in capsys.readouterr().out
    with pytest.raises(UserError, match=f"for your folder {tmp_path / 'btmri'}, give --dataset ./btmri"):
        data.load_splits("btmri", root=str(tmp_path / "nowhere"))  # the benchmark is not there: name the folder
    keys = {data.dataset_key(d) for d in ("btmri", "BTMRI", "./btmri", str(tmp_path / "btmri"))}
    assert keys == {"btmri", "btmri_folder"}
    assert runner.run_dir("runs", "biomedap", "btmri", 4, 1) != runner.run_dir("runs", "biomedap", "./btmri", 4, 1)
    assert zeroshot.folder_of(zeroshot.Args(dataset="btmri")) != zeroshot.folder_of(zeroshot.Args(dataset="./btmri"))


# ------------------------------------------------------------------ volumes
@pytest.mark.parametrize("name, kind", [("brain.nii.gz", "NIfTI"), ("brain.nii", "NIfTI"), ("ct.nrrd", "NRRD")])
def test_volume_files_are_refused_by_name_in_one_line(tmp_path, name, kind):
    folder = class_folders(tmp_path / "scans", {"a": 3, "b": 3})
    (folder / "a" / name).write_bytes(b"\x00" * 400)
    for attempt in (lambda: data.load_splits(str(folder)), lambda: data.find_images([str(folder)]),
                    lambda: data.open_image(folder / "a" / name)):
        with pytest.raises(UserError, match=f"{kind} is not read|is a {kind} volume, which is not read") as error:
            attempt()
        assert "export" in one_line(error) and "PNG" in str(error.value)


# ------------------------------------------------------------------ an interrupted or damaged download
def _download_until_stopped(root, zip_path, ready):
    import huggingface_hub

    huggingface_hub.hf_hub_download = lambda **kwargs: str(zip_path)

    def slow_extract(zip_path, target_dir, max_bytes=0):
        (Path(target_dir) / "half.png").write_bytes(b"x")
        Path(ready).write_text("unpacking")
        time.sleep(60)
    data.safe_extract = slow_extract
    data.load_splits("btmri", root=str(root), download=True)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_a_download_stopped_by_a_signal_leaves_nothing_behind(tmp_path, signal_number):
    import multiprocessing

    zip_path = zip_tree(make_official(tmp_path / "made"), tmp_path / "BTMRI.zip")
    root, ready = tmp_path / "data", tmp_path / "ready"
    process = multiprocessing.get_context("fork").Process(target=_download_until_stopped, args=(root, zip_path, ready))
    process.start()
    for _ in range(600):
        if ready.exists() or not process.is_alive():
            break
        time.sleep(0.05)
    assert ready.exists()
    assert any(p.name.startswith(".BTMRI-download-") for p in root.iterdir())  # the partial unpack, and the lock
    os.kill(process.pid, signal_number)
    process.join(30)
    assert process.exitcode == 128 + signal_number
    assert list(root.iterdir()) == []  # no partial unpack folder, no lock file


@pytest.mark.parametrize("damage", ["truncated", "corrupt entry"])
def test_a_damaged_cached_zip_names_the_cached_file_and_says_to_delete_it(tmp_path, monkeypatch, damage):
    made = zip_tree(make_official(tmp_path / "made"), tmp_path / "made.zip").read_bytes()
    blob = tmp_path / "cache" / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    if damage == "truncated":
        blob.write_bytes(made[:len(made) // 2])
    else:
        with zipfile.ZipFile(tmp_path / "made.zip") as archive:
            first = archive.infolist()[0]
        start = first.header_offset + 30 + len(first.filename) + len(first.extra)
        blob.write_bytes(made[:start] + bytes(b ^ 0xFF for b in made[start:start + 8]) + made[start + 8:])
    link = tmp_path / "cache" / "snapshots" / "main" / "BTMRI.zip"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    fake_hub(monkeypatch, link)
    for attempt in range(2):  # the same answer on every rerun, naming what to delete
        with pytest.raises(UserError) as error:
            data.load_splits("btmri", root=str(tmp_path / "data"), download=True)
        message = one_line(error)
        assert "is damaged" in message and f"delete {link} and {blob}, which it links to" in message
        assert "--download" in message and list((tmp_path / "data").iterdir()) == []


# ------------------------------------------------------------------ confusion.png of many classes
def test_confusion_png_of_200_classes_is_quick_and_bounded(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    cm = (rng.integers(0, 3, (200, 200)) + 30 * np.eye(200, dtype=int)).tolist()
    metrics = {name: {"confusion_matrix": cm, "accuracy": 40.0} for name in ("photo", "clinical", "descriptions")}
    figures = []
    save = runner.atomic_write_png
    monkeypatch.setattr(runner, "atomic_write_png", lambda fig, path: (figures.append(fig), save(fig, path)))
    start = time.perf_counter()
    runner.plot_confusion(metrics, tmp_path / "confusion.png", [f"class {i}" for i in range(200)])
    seconds = time.perf_counter() - start
    with Image.open(tmp_path / "confusion.png") as image:
        width, height = image.size
    assert seconds < 10 and width <= 2700 and height <= 2000, (seconds, width, height)
    axes = figures[0].axes
    assert all(len(ax.patches) == 200 and not ax.images and not ax.texts for ax in axes)  # one bar a class
    # 40 classes: the matrix, without a number in each of its 1,600 cells
    runner.plot_confusion({"test": {"confusion_matrix": cm[:40], "accuracy": 1.0}}, tmp_path / "c40.png")
    assert figures[-1].axes[0].images and not figures[-1].axes[0].texts
    runner.plot_confusion({"test": {"confusion_matrix": [[3, 1], [0, 4]], "accuracy": 1.0}}, tmp_path / "c2.png")
    assert [t.get_text() for t in figures[-1].axes[0].texts] == ["3", "1", "0", "4"]


# ------------------------------------------------------------------ messages
def test_a_split_file_with_a_byte_order_mark_is_read(tmp_path):
    folder = class_folders(tmp_path / "mine", {"a": 2, "b": 2})
    split = {"train": [["a/0.png", 0, "a"], ["b/0.png", 1, "b"]], "val": [], "test": [["a/1.png", 0, "a"],
                                                                                       ["b/1.png", 1, "b"]]}
    (folder / "split.json").write_text(json.dumps(split), encoding="utf-8-sig")
    assert (folder / "split.json").read_bytes().startswith(b"\xef\xbb\xbf")
    assert data.load_splits(str(folder)).classnames == ["a", "b"]


def test_a_split_file_listing_an_image_twice_reads_it_once_and_says_so(tmp_path):
    folder = class_folders(tmp_path / "mine", {"a": 2, "b": 2})
    split = {"train": [["a/0.png", 0, "a"], ["a/0.png", 0, "a"], ["b/0.png", 1, "b"]], "val": [],
             "test": [["a/1.png", 0, "a"], ["b/1.png", 1, "b"]]}
    (folder / "split.json").write_text(json.dumps(split))
    splits = data.load_splits(str(folder))
    assert len(splits.train) == 2
    assert data.data_account(splits)["left_out"] == [{"path": "a/0.png", "reason": "duplicate",
                                                      "detail": 'listed twice in "train"'}]
    split["train"][1] = ["a/0.png", 1, "b"]
    (folder / "split.json").write_text(json.dumps(split))
    with pytest.raises(UserError, match='twice in "train", as "a" and as "b"'):
        data.load_splits(str(folder))


@pytest.mark.parametrize("side", [40, 100])  # 1,600 pixels: over the limit; 10,000: over twice the limit
def test_a_very_large_image_quotes_one_pixel_limit(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write_png(tmp_path / "big.png", size=(side, side))
    with pytest.raises(UserError) as error:
        data.open_image(path)
    message = one_line(error)
    assert "1,000 pixels" in message and "2000" not in message and "2,000" not in message
    assert "shrink it below that" in message


# ------------------------------------------------------------------ run.sh
def test_run_sh_takes_a_relative_dataset_path_from_the_callers_folder(tmp_path):
    class_folders(tmp_path / "modality", {"a": 2, "b": 2})
    class_folders(tmp_path / "btmri", {"a": 2, "b": 2})
    out = tmp_path / "runs"
    (out / "biomedap" / "btmri" / "4shot" / "seed1").mkdir(parents=True)  # the benchmark's run is finished
    (out / "biomedap" / "btmri" / "4shot" / "seed1" / "metrics.json").write_text("{}")
    done = subprocess.run(["bash", str(REPO / "run.sh"), "fewshot", "biomedap", "modality,./btmri,btmri", "4", "1",
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OUT": str(out)})
    assert done.returncode == 0, done.stderr
    datasets = [line.split("--dataset ")[1].split(" ")[0] for line in done.stdout.splitlines()]
    assert datasets == [str(tmp_path / "modality"), str(tmp_path / "btmri")]  # the bare btmri is finished
