"""prompts/*.json: every benchmark has its class text, in the schema, for exactly its classes,
with enough distinct sentences of a usable length. The built-in synthetic text obeys the same rules."""
import json

import pytest

import classtext
import data

FIELDS = ("descriptions", "distinctive", "confusions")
WORDS = {"descriptions": (6, 80), "distinctive": (6, 80), "confusions": (20, 120)}


def check_sentences(text, source):
    # No warning: our text has the papers' counts of sentences (REFERENCE_SENTENCES) and word counts.
    assert classtext.validate_class_text(text, source) == [], f"{source} is below the papers' text"
    for name, entry in text["classes"].items():
        sentences = [s.strip().lower() for field in FIELDS for s in entry[field]]
        repeated = sorted({s for s in sentences if sentences.count(s) > 1})
        assert not repeated, f"{source}: class {name!r} repeats {repeated[:3]}"
        for field, (low, high) in WORDS.items():
            odd = [s for s in entry[field] if not low <= len(s.split()) <= high]
            assert not odd, f"{source}: class {name!r} {field} outside {low}..{high} words: {odd[:2]}"


@pytest.mark.parametrize("name", sorted(data.MEDICAL))
def test_prompt_file(name):
    path = classtext.PROMPTS_DIR / f"{name}.json"
    assert path.is_file(), f"{path} is missing"
    text = json.loads(path.read_text(encoding="utf-8"))
    check_sentences(text, str(path))
    assert set(text["classes"]) == set(data.CLASSNAMES[name]), (
        f"{path}: classes {sorted(text['classes'])} differ from {data.CLASSNAMES[name]}")
    assert text["template"].format("x").startswith(text["ctx_init"])
    loaded = classtext.load_class_text(name, data.CLASSNAMES[name])
    assert list(loaded["classes"]) == data.CLASSNAMES[name]


def test_synthetic_text():
    check_sentences(data.synthetic_class_text(), "synthetic")
    assert set(data.synthetic_class_text()["classes"]) == set(data.load_splits("synthetic").classnames)


@pytest.mark.parametrize("name", list(data.NATURAL))
def test_natural_class_text(name):
    """prompts/<name>.json of a natural-image benchmark: a template with {}, and for each of the
    split file's classes (its names with spaces for underscores) at least 20 descriptions, 5
    distinctive sentences and 5 confusions of 20 words or more; no sentence twice in the file."""
    path = classtext.PROMPTS_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} is not there yet")
    text = json.loads(path.read_text(encoding="utf-8"))
    assert classtext.template_problem(text["template"]) is None, f"{path}: {classtext.template_problem(text['template'])}"
    classes = {key: entry for key, entry in text["classes"].items() if not key.startswith("_")}
    assert len(classes) == data.NATURAL[name].classes, f"{path}: {len(classes)} classes"
    assert not [key for key in classes if "_" in key or key != data.nfc(key)], f"{path}: keys as the loader names them"
    seen = {}  # sentence, in lower case with single spaces -> (class, field) where it first is
    for key, entry in classes.items():
        counts = {field: len(entry.get(field, [])) for field in FIELDS}
        assert counts["descriptions"] >= 20 and counts["distinctive"] >= 5 and counts["confusions"] >= 5, \
            f"{path}: class {key!r} has {counts}"
        short = [s for s in entry["confusions"] if len(s.split()) < 20]
        assert not short, f"{path}: class {key!r} has confusions under 20 words: {short[:2]}"
        for field in FIELDS:
            for sentence in entry[field]:
                words = " ".join(sentence.lower().split())
                assert words and words not in seen, f"{path}: {sentence!r} of {key!r} {field} is also in {seen.get(words)}"
                seen[words] = (key, field)
    assert classtext.validate_class_text(text, str(path), "biomedvr", list(classes)) == []
