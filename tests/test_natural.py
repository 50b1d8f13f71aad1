"""BioMedVR's natural-image benchmarks (its Table 3) in CoOp's data layout: the registry, small
stand-ins of three of them read and run end to end on the tiny backbones, the class-name rule,
each missing-file error, run folders, `run.sh tables biomedvr-natural` and its summary table."""
import json
import re
import zlib

import numpy as np
import pytest
from PIL import Image

import classtext
import biomedap
import biomedvr
import common
import data
import report
import runner
import zeroshot
from common import UserError
from test_run import REPO, parse_job, run_sh

# Class names as CoOp's split files spell them, and where each file lies below the image folder:
# DTD and UCF101 keep a folder per class, Oxford-Pets keeps every image in one flat folder.
STAND_INS = {
    "dtd": (["banded", "blotchy", "braided"], "{cls}/{cls}_{i:04d}.jpg", "texture"),
    "oxford_pets": (["abyssinian", "american_bulldog", "american_pit_bull_terrier"], "{cls}_{i}.jpg", "pet"),
    "ucf101": (["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"], "{cls}/v_{cls}_g01_c{i:02d}.jpg", "action"),
}
COUNTS = {"train": 2, "val": 1, "test": 1}


def write_jpeg(path, size=(40, 34)):
    """Noise seeded by the path: never blank, never two files with the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def make_coop(root, name):
    """A stand-in of a natural benchmark in CoOp's layout under `root`: a few JPEGs per class and
    its split_zhou_*.json, classes listed last label first (the order must come from the labels).
    Returns the image folder."""
    classnames, pattern, _ = STAND_INS[name]
    layout = data.NATURAL[name]
    image_dir = root / layout.folder / layout.images
    split, i = {}, 0
    for part, count in COUNTS.items():
        split[part] = []
        for label, cls in reversed(list(enumerate(classnames))):
            for _ in range(count):
                relative = pattern.format(cls=cls, i=i)
                write_jpeg(image_dir / relative)
                split[part].append([relative, label, cls])
                i += 1
    (root / layout.folder / layout.split).write_text(json.dumps(split))
    return image_dir


def class_text(name):
    """Class text for a stand-in, keyed by the loader's class names (underscores as spaces)."""
    classnames, _, kind = STAND_INS[name]
    names = [c.replace("_", " ") for c in classnames]
    classes = {}
    for cls in names:
        other = next(n for n in names if n != cls)
        classes[cls] = {
            "descriptions": [f"a {cls} {kind} photographed {how}." for how in ("up close", "from afar", "in daylight")],
            "distinctive": [f"the {cls} {kind} shows a look that no other {kind} here has.",
                            f"only the {cls} {kind} has this shape and colour together."],
            "confusions": [f"a {cls} {kind} can look like a {other} {kind} in a small or blurred photograph, but the "
                           f"{cls} has its own outline and texture once the details are visible.",
                           f"under poor light a {cls} may be taken for a {other}; compare the colours and the "
                           f"shapes of the two before deciding which {kind} the image shows."]}
    return {"template": f"a photo of a {{}}, a type of {kind}.", "classes": classes}


@pytest.fixture
def coop(tmp_path, monkeypatch, backbones):
    """A data root with the three stand-ins, their class text in a prompts folder of the test's
    own, and the cached tiny backbones. Returns the root."""
    root, prompts = tmp_path / "data", tmp_path / "prompts"
    prompts.mkdir()
    for name in STAND_INS:
        make_coop(root, name)
        (prompts / f"{name}.json").write_text(json.dumps(class_text(name)))
    monkeypatch.setattr(classtext, "PROMPTS_DIR", prompts)
    monkeypatch.setattr(common, "load_backbone", lambda name, device: backbones(name))
    return root


# ------------------------------------------------------------------ the registry
def test_registry_keeps_medical_and_natural_apart_and_run_sh_agrees():
    assert not set(data.MEDICAL) & set(data.NATURAL) and len(data.MEDICAL) == 11
    assert data.BENCHMARKS == (*data.MEDICAL, *data.NATURAL)
    # CoOp's DATASETS.md: the folder under the data root, the image folder in it, the split file
    assert {name: (lay.folder, lay.images, lay.split) for name, lay in data.NATURAL.items()} == {
        "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
        "food101": ("food-101", "images", "split_zhou_Food101.json"),
        "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
        "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
        "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
        "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
        "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json")}
    assert sum(lay.classes for lay in data.NATURAL.values()) == 498
    script = (REPO / "run.sh").read_text()
    for var, names in (("MEDICAL_DATASETS", data.MEDICAL), ("NATURAL_DATASETS", data.NATURAL)):
        assert re.search(rf'^{var}="(.*)"$', script, re.M).group(1).split() == list(names)


def test_help_and_the_unknown_dataset_error_list_both_kinds():
    for module in (biomedap, biomedvr, zeroshot):
        args_cls = zeroshot.Args if module is zeroshot else runner.cli_args(module)
        text = " ".join(runner.build_parser(args_cls).format_help().split())
        assert all(name in text for name in data.BENCHMARKS), module.__name__
        assert "natural benchmarks (in CoOp's data folder, fetched by hand)" in text
    with pytest.raises(UserError) as error:
        data.load_splits("cifar10")
    assert "natural benchmarks" in str(error.value) and all(n in str(error.value) for n in data.BENCHMARKS)


# ------------------------------------------------------------------ reading CoOp's layout
@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_coop_layout_is_read_with_spaces_for_underscores(tmp_path, capsys, name):
    image_dir = make_coop(tmp_path, name)
    splits = data.load_splits(name.upper(), root=str(tmp_path))
    classnames, pattern, _ = STAND_INS[name]
    assert splits.name == name and splits.classnames == [c.replace("_", " ") for c in classnames]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    first = splits.train[0]  # the file lists the last label first
    assert first.label == 2 and first.classname == classnames[2].replace("_", " ")
    assert first.path == str(image_dir / pattern.format(cls=classnames[2], i=0))
    expected = data.NATURAL[name].classes
    assert f"has 3 classes, CoOp's has {expected}: results are not comparable" in capsys.readouterr().err


def test_few_shot_and_base_novel_follow_the_medical_rules(tmp_path):
    make_coop(tmp_path, "ucf101")
    splits = data.load_splits("ucf101", root=str(tmp_path))
    few = data.few_shot_splits(splits, 1, seed=1)
    assert few.train == data.few_shot(splits.train, 1, 1) and len(few.train) == 3 and few.test == splits.test
    base, novel = data.subsample_classes(few, "base"), data.subsample_classes(splits, "novel")
    assert base.classnames == ["Apply Eye Makeup", "Apply Lipstick"] and novel.classnames == ["Archery"]
    assert {i.label for i in novel.test} == {0} and {i.classname for i in novel.test} == {"Archery"}


def test_two_labels_that_the_underscore_rule_makes_one_name_are_refused(tmp_path):
    image_dir = make_coop(tmp_path, "dtd")
    split_path = tmp_path / "dtd" / data.NATURAL["dtd"].split
    split = json.loads(split_path.read_text())
    for part in split.values():  # "braided" becomes "blotchy_x" and "blotchy" becomes "blotchy x"
        for entry in part:
            entry[2] = {"braided": "blotchy_x", "blotchy": "blotchy x"}.get(entry[2], entry[2])
    split_path.write_text(json.dumps(split))
    with pytest.raises(UserError, match="one distinct name each"):
        data.load_splits("dtd", root=str(tmp_path))
    assert image_dir.is_dir()


def test_run_folders_and_recorded_names_of_natural_benchmarks(tmp_path):
    assert data.dataset_key("Oxford_Pets") == data.dataset_arg("OXFORD_PETS") == "oxford_pets"
    assert runner.run_dir(str(tmp_path), "biomedvr-fused", "UCF101", 16, 2, backbone="clip") == \
        tmp_path / "clip" / "biomedvr-fused" / "ucf101" / "16shot" / "seed2"


# ------------------------------------------------------------------ what is missing, in one line
COOP = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@pytest.mark.parametrize("present, download, expected", [
    ((), False, "dataset dtd not found: {split} and {images}/ do not exist; fetch them as CoOp's data "
                "instructions say: {coop}#dtd"),
    (("split",), False, "dataset dtd not found: {images}/ does not exist; fetch it as CoOp's data instructions "
                        "say: {coop}#dtd"),
    (("images",), False, "dataset dtd not found: {split} does not exist; fetch it as CoOp's data instructions "
                         "say: {coop}#dtd"),
    ((), True, "--download does not fetch the natural-image benchmarks: fetch {split} and {images}/ by hand as "
               "CoOp's data instructions say: {coop}#dtd"),
])
def test_a_missing_split_file_or_image_folder_says_what_to_fetch(tmp_path, present, download, expected):
    make_coop(tmp_path, "dtd")
    layout = data.NATURAL["dtd"]
    split, images = tmp_path / "dtd" / layout.split, tmp_path / "dtd" / layout.images
    if "split" not in present:
        split.unlink()
    if "images" not in present:
        images.rename(tmp_path / "elsewhere")
    with pytest.raises(UserError) as error:
        data.load_splits("dtd", root=str(tmp_path), download=download)
    assert str(error.value) == expected.format(split=split, images=images, coop=COOP)


def test_every_natural_benchmark_points_to_its_own_section(tmp_path):
    for name, layout in data.NATURAL.items():
        with pytest.raises(UserError) as error:
            data.load_splits(name, root=str(tmp_path))
        message = str(error.value)
        assert "\n" not in message and message.endswith(f"{COOP}#{layout.section}")
        assert str(tmp_path / layout.folder / layout.split) in message
        assert f"{tmp_path / layout.folder / layout.images}/" in message
    sections = re.findall(r"#([a-z0-9]+)", " ".join(f"#{lay.section}" for lay in data.NATURAL.values()))
    assert sections == ["caltech101", "food101", "dtd", "eurosat", "oxfordpets", "flowers102", "ucf101"]


def test_an_image_the_split_file_lists_but_the_folder_lacks_is_named(tmp_path):
    image_dir = make_coop(tmp_path, "oxford_pets")
    victim = image_dir / "american_bulldog_10.jpg"
    victim.unlink()
    with pytest.raises(UserError, match=f"cannot be opened, the first is {re.escape(str(victim))}"):
        data.load_splits("oxford_pets", root=str(tmp_path))


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, capsys):
    for module, extra in ((zeroshot, []), (biomedvr, ["--frame", "4"])):
        with pytest.raises(SystemExit) as exit_:
            argv = ["--dataset", "eurosat", "--root", str(tmp_path), "--backbone", "tiny",
                    "--out", str(tmp_path / "runs"), "--workers", "0", "--download", *extra]
            if module is zeroshot:
                runner.run_cli(zeroshot.main, zeroshot.Args, argv=argv)
            else:
                runner.run_method(module, argv=argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: --download does not fetch") and err.strip().endswith("#eurosat")
    assert not (tmp_path / "runs").exists()


def test_missing_class_text_of_a_natural_benchmark_is_named(tmp_path, monkeypatch):
    make_coop(tmp_path / "data", "dtd")
    monkeypatch.setattr(classtext, "PROMPTS_DIR", tmp_path / "prompts")
    splits = data.load_splits("dtd", root=str(tmp_path / "data"))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'prompts' / 'dtd.json'} does not exist")):
        classtext.load_class_text("dtd", splits.classnames, method="biomedvr")


# ------------------------------------------------------------------ end to end on the tiny backbones
def test_biomedvr_runs_on_dtd_and_ucf101(coop, tmp_path):
    out = str(tmp_path / "runs")
    for name in ("dtd", "ucf101"):
        argv = ["--dataset", name, "--root", str(coop), "--backbone", "tiny-clip", "--frame", "4", "--shots", "1",
                "--epochs", "1", "--workers", "0", "--out", out, "--device", "cpu"]
        metrics = runner.run(biomedvr, runner.parse_args(biomedvr, argv))
        folder = runner.run_dir(out, "biomedvr", name, 1, 1, backbone="tiny-clip")
        record = json.loads((folder / "metrics.json").read_text())
        assert metrics["test"]["n"] == 3 and record["args"]["dataset"] == name
        assert record["shots_per_class"] == dict.fromkeys([c.replace("_", " ") for c in STAND_INS[name][0]], 1)


def test_biomedap_runs_on_oxford_pets_and_base_to_novel_on_ucf101(coop, tmp_path):
    out = str(tmp_path / "runs")
    common_flags = ["--root", str(coop), "--backbone", "tiny", "--shots", "1", "--epochs", "1", "--workers", "0",
                    "--out", out, "--device", "cpu"]
    metrics = runner.run(biomedap, runner.parse_args(biomedap, ["--dataset", "oxford_pets", *common_flags]))
    assert metrics["test"]["n"] == 3
    record = json.loads((runner.run_dir(out, "biomedap", "oxford_pets", 1, 1, backbone="tiny")
                         / "metrics.json").read_text())
    assert record["shots_per_class"] == {"abyssinian": 1, "american bulldog": 1, "american pit bull terrier": 1}
    b2n = runner.run(biomedap, runner.parse_args(biomedap, ["--dataset", "ucf101", "--subsample", "base",
                                                          *common_flags]))
    assert b2n["base"]["n"] == 2 and b2n["novel"]["n"] == 1


def test_zeroshot_runs_on_the_three_stand_ins(coop, tmp_path):
    for name in STAND_INS:
        args = runner.parse_args(zeroshot.Args, ["--dataset", name, "--root", str(coop), "--backbone", "tiny",
                                                 "--workers", "0", "--out", str(tmp_path / "runs"), "--device", "cpu"])
        metrics = zeroshot.main(args)
        assert {k: m["n"] for k, m in metrics.items()} == dict.fromkeys(
            ("photo_template", "clinical_template", "descriptions"), 3)
        record = json.loads((tmp_path / "runs" / "tiny" / "zeroshot" / name / "seed1" / "metrics.json").read_text())
        assert record["clinical_template"] == class_text(name)["template"]


def test_check_setup_covers_natural_benchmarks(coop, tmp_path, capsys):
    flags = ["--root", str(coop), "--backbone", "tiny-clip", "--frame", "4"]
    runner.run_method(biomedvr, argv=["--check-setup", "dtd", "oxford_pets", "ucf101", *flags])
    assert "setup ok: backbone tiny-clip, datasets dtd oxford_pets ucf101" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        runner.run_method(biomedvr, argv=["--check-setup", "dtd", "food101", *flags])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning: ")]
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: dataset food101 not found")


# ------------------------------------------------------------------ run.sh and report.py
def test_tables_biomedvr_natural_is_table_3():
    jobs = [parse_job(line) for line in run_sh("tables", "biomedvr-natural", "--dry-run", env={"OUT": "/nonexistent"})]
    assert {(a.dataset, a.shots, a.seed) for _, a in jobs} == {(d, 16, s) for d in data.NATURAL for s in (1, 2, 3)}
    assert len(jobs) == 21 and all(m is biomedvr for m, _ in jobs)
    assert {(a.backbone, a.cs_anchor, a.subsample, a.epochs) for _, a in jobs} == {("clip", "fused", "all", 400)}
    lines = run_sh("tables", "biomedvr-natural", "--dry-run", "--", "--backbone", "ViT-B-16:openai",
                   "--cs-anchor", "positive", env={"OUT": "/nonexistent"})
    assert {(a.backbone, a.cs_anchor) for _, a in map(parse_job, lines)} == {("ViT-B-16:openai", "positive")}
    natural = [parse_job(line)[1] for line in run_sh("fewshot", "biomedvr", "natural", "16", "1", "--dry-run",
                                                     env={"OUT": "/nonexistent"})]
    assert [a.dataset for a in natural] == list(data.NATURAL)


def test_tables_biomedvr_natural_skips_its_finished_runs(tmp_path):
    runner.atomic_write_json(tmp_path / "clip" / "biomedvr-fused" / "dtd" / "16shot" / "seed1" / "metrics.json", {})
    jobs = [parse_job(line)[1] for line in run_sh("tables", "biomedvr-natural", "--dry-run", env={"OUT": str(tmp_path)})]
    assert len(jobs) == 20 and ("dtd", 1) not in {(a.dataset, a.seed) for a in jobs}


def test_report_gives_the_natural_benchmarks_their_own_table_and_averages(tmp_path):
    def fake(dataset, seed, accuracy, shots=16, suffix="", metrics=None):
        path = tmp_path / "clip" / "biomedvr-fused" / dataset / f"{shots}shot{suffix}" / f"seed{seed}" / "metrics.json"
        runner.atomic_write_json(path, {"metrics": metrics or {"test": {"accuracy": accuracy}}})
    fake("btmri", 1, 70.0)
    fake("busi", 1, 80.0)
    fake("dtd", 1, 60.0)
    fake("dtd", 2, 62.0)
    fake("eurosat", 1, 90.0)
    for d, base, novel in (("btmri", 80.0, 60.0), ("dtd", 50.0, 40.0), ("eurosat", 70.0, 60.0)):
        fake(d, 1, None, suffix="_base2novel", metrics={"base": {"accuracy": base}, "novel": {"accuracy": novel}})
    text = report.summarize(tmp_path)
    medical, natural = text.split("## clip/biomedvr-fused: few-shot accuracy (%) on the natural-image benchmarks "
                                  "(BioMedVR's Table 3), mean ± std over seeds (their number; K=0: "
                                  "zero-shot; n: test images)")
    assert "## clip/biomedvr-fused: few-shot accuracy (%), mean ± std" in medical
    assert "| **average** | | – | 75.00 (2 datasets) |" in medical and "dtd" not in medical
    natural_table = natural.split("\n## ")[0]
    assert "| dtd | – | – | 61.00 ± 1.41 (2) |" in natural_table and "| eurosat | – | – | 90.00 (1 seed) |" in natural_table
    assert "| **average** | | – | 75.50 (2 datasets) |" in natural_table and "btmri" not in natural_table
    assert "| **average** (1) | | | 80.00 | 60.00 |" in text and "| **natural average** (2) | | | 60.00 | 50.00 |" in text
    series = report.fewshot_series(report._collect(tmp_path))
    assert series["average"]["clip/biomedvr-fused"] == [(16, 75.0, 75.0, 75.0)]
    assert series["natural average"]["clip/biomedvr-fused"][0][:2] == (16, 75.5)
    bars = report.base2novel_series(report._collect(tmp_path))["clip/biomedvr-fused"]
    assert [b[0] for b in bars] == ["btmri K=16", "dtd K=16", "eurosat K=16", "natural average"]
    assert (tmp_path / "fewshot.png").is_file() and (tmp_path / "base2novel.png").is_file()
