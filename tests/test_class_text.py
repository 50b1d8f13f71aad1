"""Class text of your own data: each command asks only for what it reads, every problem of a
prompts.json in one error, the starter `python classtext.py starter FOLDER`, templates checked the way
they are filled, class keys in NFC, and sentences checked against the text tower's context length."""
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import biomedap
import biomedvr
import classtext
import common
import data
import runner
from common import UserError

REPO = Path(__file__).resolve().parents[1]
ONE_EACH = {"descriptions": ["a round bright spot near the middle of the image"],
            "distinctive": ["only this class shows one evenly filled bright spot"],
            "confusions": ["a faint spot of the other class may look like this one, but it is dimmer"]}


def text_of(classes, template="a photo of a {}.", **fields):
    """Class text with `template` and, for every class, the given lists (else empty ones)."""
    return {"template": template,
            "classes": {c: {f: list(fields.get(f, [])) for f in classtext.TEXT_FIELDS} for c in classes}}


def own_folder(folder, classes=("bright_spot", "dark_spot"), images=5, grey=(60, 120, 20)):
    """A folder of small generated PNGs, one sub-folder per class, each class its own grey level
    (grey: first level, step between classes, noise)."""
    for label, name in enumerate(classes):
        for i in range(images):
            rng = np.random.default_rng([label, i])
            pixels = np.clip(rng.normal(grey[0] + grey[1] * label, grey[2], (16, 16, 3)), 0, 255).astype(np.uint8)
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


def write_text(folder, text):
    (folder / "prompts.json").write_text(json.dumps(text, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------ A: what each command needs
def test_each_command_asks_only_for_what_it_reads(tmp_path, capsys):
    write_text(tmp_path, text_of(["a", "b"]))
    loaded = classtext.load_class_text(str(tmp_path), ["a", "b"], method="zeroshot")
    assert loaded["classes"]["a"] == {"descriptions": [], "distinctive": [], "confusions": []}
    assert loaded["ctx_init"] == "a photo of a"  # left out: the template's words before {}
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError) as error:
        classtext.load_class_text(str(tmp_path), ["a", "b"], method="biomedap")
    lines = str(error.value).splitlines()
    assert len(lines) == 3 and all('"descriptions" is empty: BiomedAP needs at least one' in line for line in lines[:2])
    with pytest.raises(UserError) as error:
        classtext.load_class_text(str(tmp_path), ["a", "b"], method="biomedvr")
    assert len(str(error.value).splitlines()) == 2 * 3 + 1 and "BioMedVR" in str(error.value)

    write_text(tmp_path, text_of(["a", "b"], **ONE_EACH))
    for method in ("biomedap", "biomedvr"):
        assert classtext.load_class_text(str(tmp_path), ["b"], method=method)["classes"]["b"] == ONE_EACH
    err = capsys.readouterr().err.splitlines()
    # below the papers' counts: warnings naming the classes and counts, only for what is read
    assert [line for line in err if '"descriptions"' in line][0].endswith("in 2 class(es): a (1), b (1)")
    assert sum('"distinctive"' in line for line in err) == 1  # BioMedVR's load only
    assert sum('"confusions" shorter than' in line and "a (1 of 1), b (1 of 1)" in line for line in err) == 1
    assert all(line.startswith("warning: class text ") for line in err)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    text = text_of(["a", "b"], descriptions=["fine"])
    text["template"] = "a photo of {T1} a {}."
    text["classes"]["a"]["distinctive"] = ["ok", 3]
    text["classes"]["b"]["description"] = ["misspelt key"]
    text["templates"] = "misspelt too"
    write_text(tmp_path, text)
    with pytest.raises(UserError) as error:  # the commands print it as `error: {message}`
        classtext.load_class_text(str(tmp_path), ["a", "b", "c"], method="zeroshot")
    lines = str(error.value).splitlines()
    assert len(lines) == 6 and all(line.startswith(f"class text {tmp_path / 'prompts.json'}: ") for line in lines)
    for problem in ("'templates'", "{T1}", '"distinctive" must be a list', "'description'", "no text for the "
                    "class(es) c"):
        assert sum(problem in line for line in lines[:-1]) == 1, problem
    assert lines[-1].endswith("5 problem(s), listed above; fix them all, then run again")


# ------------------------------------------------------------------ B: the starter
def test_starter_writes_every_class_loads_for_zero_shot_and_never_overwrites(tmp_path, capsys):
    folder = own_folder(tmp_path / "mine", ["glioma_tumor", unicodedata.normalize("NFD", "café_au_lait")], 2)
    (folder / ".hidden").mkdir()
    assert classtext.cli(["starter", str(folder)]) == 0
    path = folder / "prompts.json"
    assert "zero-shot baseline runs on it now" in capsys.readouterr().out
    text = json.loads(path.read_text(encoding="utf-8"))
    assert list(text["classes"]) == ["café au lait", "glioma tumor"]  # NFC, the loader's class names
    assert all(unicodedata.is_normalized("NFC", name) for name in text["classes"])
    assert text["template"] == "a photo of a {}." and all("_" in key for key in set(text) - {"template", "classes"})
    names = data.load_splits(str(folder)).classnames  # matched in NFC whatever form the folder names have
    assert classtext.load_class_text(str(folder), names, method="zeroshot")["classes"]["glioma tumor"]["confusions"] == []
    with pytest.raises(UserError, match="BiomedAP needs at least one"):
        classtext.load_class_text(str(folder), names, method="biomedap")

    before = path.read_bytes()
    code = classtext.cli(["starter", str(folder), "--template", "an MR photo of a {}."])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "already exists" in err and len(err.splitlines()) == 1
    assert path.read_bytes() == before

    for entry in text["classes"].values():
        entry.update(ONE_EACH)
    path.write_text(json.dumps(text), encoding="utf-8")
    for method in ("biomedap", "biomedvr"):
        assert classtext.load_class_text(str(folder), names, method=method)["classes"][names[0]] == ONE_EACH


def test_starter_refuses_a_bad_template_and_a_folder_without_classes(tmp_path, capsys):
    (tmp_path / "mine" / "a").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for argv, message in ((["starter", str(tmp_path / "mine"), "--template", "a {} in {T1}"], "{T1}"),
                          (["starter", str(tmp_path / "empty")], "no class sub-folders"),
                          (["starter", str(tmp_path / "nowhere")], "is not a folder")):
        assert classtext.cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob("prompts.json"))


# ------------------------------------------------------------------ C: the text tower's context length
@pytest.mark.parametrize("name", ["tiny", "tiny-clip"])
def test_text_cut_by_the_context_length_warns_and_classes_cut_alike_are_refused(backbones, name, capsys):
    bb = backbones(name)
    limit = bb.tokenizer.context_length
    assert limit == {"tiny": 128, "tiny-clip": 77}[name]
    long = " ".join(["photo"] * (limit + 10))  # a known word: one token each in both vocabularies
    ok = text_of(["short", long + " x"], descriptions=["a round spot", "a dark spot"])
    classtext.check_text_fits(bb, ok, list(ok["classes"]), ("template",))
    err = capsys.readouterr().err
    assert err.startswith(f"warning: class text longer than the text tower's {limit} tokens is cut")
    tokens = int(re.search(r"in 1 class\(es\): photo photo .* photo x \(template, up to (\d+) tokens\)", err)[1])
    assert limit + 10 < tokens < limit + 20

    cut_alike = text_of([long + " alpha", long + " beta"])
    with pytest.raises(UserError, match="same template prompt after tokenisation") as error:
        classtext.check_text_fits(bb, cut_alike, list(cut_alike["classes"]), ("template",))
    assert "alpha" in str(error.value) and "beta" in str(error.value)
    # Without the cut the same names are told apart.
    classtext.check_text_fits(bb, text_of(["alpha", "beta"]), ["alpha", "beta"], ("template",))


def test_classes_the_tokenizer_makes_the_same_are_refused(backbones, capsys):
    bb = backbones("tiny")
    lower = text_of(["Glioma", "glioma"])  # both tokenizers lower-case
    with pytest.raises(UserError, match="Glioma, glioma have the same template prompt"):
        classtext.check_text_fits(bb, lower, ["Glioma", "glioma"], ("template",))
    same = text_of(["a", "b"], descriptions=["a round spot", "A round spot"])
    with pytest.raises(UserError, match="a, b have the same descriptions after tokenisation"):
        classtext.check_text_fits(bb, same, ["a", "b"], ("template", "descriptions"))
    # BioMedVR: one shared set of several is a warning, all of them an error
    shared = text_of(["a", "b"], **ONE_EACH)
    shared["classes"]["b"]["distinctive"] = ["only this class shows a dark ring"]
    classtext.check_text_fits(bb, shared, ["a", "b"], classtext.TEXT_FIELDS)
    err = capsys.readouterr().err
    assert "a, b have the same descriptions" in err and "a, b have the same confusions" in err
    with pytest.raises(UserError, match="same descriptions and distinctive and confusions"):
        classtext.check_text_fits(bb, text_of(["a", "b"], **ONE_EACH), ["a", "b"], classtext.TEXT_FIELDS)
    # a class without descriptions matches no other (zero-shot then skips that scoring)
    classtext.check_text_fits(bb, text_of(["a", "b"]), ["a", "b"], ("template", "descriptions"))


# ------------------------------------------------------------------ D: templates
@pytest.mark.parametrize("template, found", [
    ("a MR photo of a {} in the brain {T1-weighted}.", "found {}, {T1-weighted}"),
    ("a MR photo of a {0} in the brain.", "found {0}"),
    ("a MR photo of a {!r}.", "found {!r}"),
    ("a MR photo of a brain.", "found none"),
    ("a MR photo of a { {}.", "not a format string"),
    ("a MR photo of a {} }.", "not a format string"),
])
def test_templates_are_checked_by_the_formatting_that_fills_them(tmp_path, template, found):
    write_text(tmp_path, text_of(["a"], template, **ONE_EACH))
    for method in ("zeroshot", "biomedap", "biomedvr"):
        with pytest.raises(UserError) as error:
            classtext.load_class_text(str(tmp_path), ["a"], method=method)
        lines = str(error.value).splitlines()
        assert len(lines) == 2 and found in lines[0] and "{{ or }}" in lines[0]


def test_doubled_braces_are_literal_braces(tmp_path):
    write_text(tmp_path, text_of(["glioma"], "a MR photo of a {} in the brain {{T1-weighted}}.", **ONE_EACH))
    text = classtext.load_class_text(str(tmp_path), ["glioma"], method="biomedap")
    assert text["template"].format("glioma") == "a MR photo of a glioma in the brain {T1-weighted}."
    assert text["ctx_init"] == "a MR photo of a"
    typo = classtext.perturbed_sentences(text, ["glioma"])["typo"][0]  # typos leave the braces escaped
    assert typo.startswith("a MR photo of a glioma") and "{" in typo and "}" in typo


# ------------------------------------------------------------------ E: NFC
def test_class_keys_are_read_in_nfc(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    write_text(tmp_path, text_of([nfd], **ONE_EACH))
    assert list(classtext.load_class_text(str(tmp_path), ["café"], method="biomedvr")["classes"]) == ["café"]
    both = text_of([nfd, "café"], **ONE_EACH)
    with pytest.raises(UserError, match="same name in Unicode NFC"):
        classtext.validate_class_text(both, "mine.json")


# ------------------------------------------------------------------ end to end on your own folder
def test_both_methods_train_on_one_sentence_per_field(tmp_path, backbones, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_backbone", lambda name, device: backbones(name))
    folder = own_folder(tmp_path / "spots")
    text = text_of(["bright spot", "dark spot"], **ONE_EACH)
    text["classes"]["dark spot"]["descriptions"] = ["a dark even image without any bright spot"]
    write_text(folder, text)
    common_args = dict(dataset=str(folder), shots=2, epochs=1, workers=0, device="cpu")
    ap = runner.run(biomedap, runner.cli_args(biomedap)(backbone="tiny", out=str(tmp_path / "ap"), **common_args))
    vr = runner.run(biomedvr, runner.cli_args(biomedvr)(backbone="tiny-clip", frame=4, batch_size=4, out=str(tmp_path / "vr"),
                                     **common_args))
    assert ap["test"]["n"] == vr["test"]["n"] == 2
    assert "fewer \"descriptions\" than the 20 per class" in capsys.readouterr().err


def test_zero_shot_runs_on_a_template_only_file_and_skips_the_descriptions(tmp_path):
    folder = own_folder(tmp_path / "spots")
    write_text(folder, {"template": "a photo of a {}.", "classes": {"bright spot": {}, "dark spot": {}}})
    out = subprocess.run([sys.executable, "zeroshot.py", "--dataset", str(folder), "--backbone", "tiny",
                          "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "runs")],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "skipping the descriptions scoring: 2 class(es) have no descriptions" in out.stderr
    [path] = (tmp_path / "runs").rglob("metrics.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert {"photo_template", "clinical_template"} <= set(metrics) and "descriptions" not in metrics
