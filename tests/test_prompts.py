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


@pytest.mark.parametrize("name", sorted(data.DATASETS))
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
