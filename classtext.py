"""The class text both methods read, and the commands that make it.

    python classtext.py write FOLDER --model MODEL [--base-url URL]   a language model writes it
    python classtext.py starter FOLDER [--template T]                 empty lists, to fill by hand
    python classtext.py import FOLDER|DATASET --descriptions FILE [--distinctive FILE] [--confusions FILE]
    python classtext.py check FOLDER|DATASET [--class-text FILE] [--backbone NAME]

Class text is one JSON file per dataset (prompts/<name>.json for a benchmark, FOLDER/prompts.json
for your own folder): a template with {} for the class name and, per class, three lists of
sentences: `descriptions` (BiomedAP's high anchor, BioMedVR's descriptive attributes),
`distinctive` and `confusions` (BioMedVR's distinctive and confusion-aware attributes). The papers
had a language model write theirs (BiomedAP averages BiomedCoOp's GPT-4 descriptions; BioMedVR's
released generators ask an OpenAI-compatible server for the three kinds). `write` does the same
with prompts of our own (PROMPTS), through the official `openai` package, against OpenAI or any
compatible server, local ones included; what leaves the machine is the class names, the template
and the counts, never an image. Each method and zeroshot.py run on another file with
`--class-text FILE`.

Sections, in order: the schema and its checks; reading a class-text file (and the run-folder key
of --class-text); BiomedAP's prompt perturbations; fitting the text tower; the starter; one
sentence's checks; writing with a language model (prompts, server, the session); import; check;
the command line.
"""
import argparse
import hashlib
import ipaddress
import io
import json
import os
import queue
import random
import re
import shutil
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext, redirect_stderr
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

import data
from common import OneLineParser, UserError, load_backbone, one_line
from data import nfc

# ---------------------------------------------------------------- the schema and its checks

TEXT_FIELDS = ("descriptions", "distinctive", "confusions")
# Sentences per class in the papers' class text, which prompts/*.json meets. Your own text may
# have fewer (a warning says so): the methods then average and sample over less of it.
REFERENCE_SENTENCES = {"descriptions": 20, "distinctive": 5, "confusions": 5}
REFERENCE_CONFUSION_WORDS = 20
# What each command reads of the class text. NEEDS: what every class must fill (one sentence is
# enough; the template is always needed). ENCODES: the sentences it puts through the text tower.
CLASS_TEXT_NEEDS = {"zeroshot": (), "biomedap": ("ctx_init", "descriptions"), "biomedvr": TEXT_FIELDS}
CLASS_TEXT_ENCODES = {"zeroshot": ("template", "descriptions"), "biomedap": ("template", "descriptions"),
                      "biomedvr": TEXT_FIELDS}
COMMAND_NAMES = {"zeroshot": "the zero-shot baseline", "biomedap": "BiomedAP", "biomedvr": "BioMedVR"}
BRACES = "write a literal brace twice, {{ or }}"


def template_problem(template: str) -> str | None:
    """Why the methods could not fill `template` with a class name, or None. They fill it with
    `template.format(name)`, so it needs exactly one `{}` and every other brace doubled."""
    try:
        slots = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(template)
                 if name is not None]
    except ValueError as error:
        return f'"template" {template!r} is not a format string ({error}): {BRACES}'
    if slots != [("", None, "")]:
        found = ", ".join("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                          for name, conv, spec in slots) or "none"
        return (f'"template" {template!r} needs exactly one {{}} for the class name and no other {{...}}, '
                f"found {found}: {BRACES}")
    return None


def template_prefix(template: str) -> str:
    """The words of a valid template before its class slot, as they are after formatting."""
    return template.format("\0").split("\0")[0]


def validate_class_text(text, source: str, method: str | None = None, classnames=None) -> list[str]:
    """Check class text (the schema of prompts/*.json) for what `method` reads of it (None: every
    key, at least one sentence each); return the warnings, one line each.

    All problems are gathered and raised as one UserError, a line per problem and a summary line.
    Fewer sentences than the papers' text has (REFERENCE_SENTENCES) is a warning, not a problem.
    Keys starting with "_" are comments. `classnames`: the classes the text must cover.
    """
    needs = CLASS_TEXT_NEEDS[method] if method else ("ctx_init",) + TEXT_FIELDS
    reader = COMMAND_NAMES.get(method, "the methods")
    if not isinstance(text, dict):
        raise UserError(f'class text {source}: the top level must be an object with "template" and "classes"')
    problems = []
    unknown = [key for key in text if key not in ("template", "ctx_init", "classes") and not key.startswith("_")]
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))} (template, ctx_init and classes are "
                        "read; keys starting with _ are comments)")
    template, prefix = text.get("template"), None
    if not isinstance(template, str):
        problems.append('"template" must be a string with {} for the class name, e.g. "a photo of a {}."')
    elif (problem := template_problem(template)):
        problems.append(problem)
    else:
        prefix = template_prefix(template)
    ctx_init = text.get("ctx_init")
    if ctx_init is None:
        if "ctx_init" in needs and prefix is not None and not prefix.strip():
            problems.append(f'"template" {template!r} has no words before {{}} and there is no "ctx_init": '
                            f"{reader} learns its context from those words")
    elif not isinstance(ctx_init, str) or not ctx_init.strip():
        problems.append('"ctx_init" must be a non-empty string, the first words of the template '
                        "(or leave it out: then it is the words before {})")
    elif prefix is not None and not prefix.startswith(ctx_init):
        problems.append(f'"template" {template!r} must start with "ctx_init" {ctx_init!r}')

    classes = text.get("classes")
    if not isinstance(classes, dict) or not classes:
        problems.append('"classes" must be an object with an entry per class')
        classes = {}
    spelled = {}  # NFC name -> the key as written: names from folders are NFC, keys must match them
    for name in classes:
        first = spelled.setdefault(nfc(name), name)
        if first != name:
            problems.append(f'classes "{first}" and "{name}" are the same name in Unicode NFC: merge them')
    for name, entry in classes.items():
        if not isinstance(entry, dict):
            problems.append(f'class "{name}" must be an object with {", ".join(TEXT_FIELDS)}')
            continue
        unknown = [key for key in entry if key not in TEXT_FIELDS and not key.startswith("_")]
        if unknown:
            problems.append(f'class "{name}": unknown key(s) {", ".join(map(repr, unknown))} '
                            f"({', '.join(TEXT_FIELDS)} are read; keys starting with _ are comments)")
        for field in TEXT_FIELDS:
            sentences = entry.get(field, [])
            if not isinstance(sentences, list) or not all(isinstance(s, str) and s.strip() for s in sentences):
                problems.append(f'class "{name}": "{field}" must be a list of non-empty strings')
            elif field in needs and not sentences:
                problems.append(f'class "{name}": "{field}" is {"empty" if field in entry else "missing"}: '
                                f"{reader} needs at least one sentence")
    missing = [c for c in classnames or () if classes and nfc(c) not in spelled]
    if missing:
        problems.append(f"no text for the class(es) {', '.join(missing)}; its classes are "
                        f"{', '.join(classes)} (names must match the dataset's class names)")
    if problems:
        lines = [f"class text {source}: {problem}" for problem in problems]
        raise UserError("\n".join(lines + [f"class text {source}: {len(problems)} problem(s), listed above; "
                                           "fix them all, then run again"]))

    warnings = []
    for field in (f for f in TEXT_FIELDS if f in needs):
        few = [f"{name} ({len(entry.get(field, []))})" for name, entry in classes.items()
               if len(entry.get(field, [])) < REFERENCE_SENTENCES[field]]
        if few:
            warnings.append(f'class text {source}: fewer "{field}" than the {REFERENCE_SENTENCES[field]} per '
                            f"class of the papers' text, in {len(few)} class(es): {data.listed(few)}")
    if "confusions" in needs:
        short = {name: sum(len(s.split()) < REFERENCE_CONFUSION_WORDS for s in entry.get("confusions", []))
                 for name, entry in classes.items()}
        listed = [f"{name} ({n} of {len(classes[name]['confusions'])})" for name, n in short.items() if n]
        if listed:
            warnings.append(f'class text {source}: "confusions" shorter than the papers\' {REFERENCE_CONFUSION_WORDS} '
                            f"words (name the look-alike and how to tell them apart) in: {data.listed(listed)}")
    return warnings



# ---------------------------------------------------------------- reading a class-text file
PROMPTS_DIR = Path(__file__).parent / "prompts"  # the benchmarks' text; no command writes there
DEFAULT_TEMPLATE = "a photo of a {}."


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object."""


def _refuse_duplicate_keys(pairs):
    found = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def read_json(path, what: str = "class text"):
    """The JSON value in `path`. A UTF-8 byte-order mark is accepted (Windows editors write one); a
    key given twice in one object is an error naming it (a JSON reader would keep the last without
    a word). Every problem is a UserError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from None
    try:
        return json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as error:
        raise UserError(f'{what} {path}: the key "{error.args[0]}" is given twice in one object (only the last '
                        "would be read): merge the two") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except ValueError as error:
        raise UserError(f"cannot read {what} {path}: {error}") from None


def is_benchmark(dataset) -> bool:
    """A benchmark name (any case) or `synthetic`: text that ships with the code."""
    return str(dataset).lower() in data.BENCHMARKS or str(dataset).lower() == "synthetic"


def own_text_path(dataset) -> Path | None:
    """Where a dataset's own class text is: prompts/<name>.json for a benchmark, FOLDER/prompts.json
    for your own folder, None for `synthetic` (its text is built in)."""
    name = str(dataset).lower()
    if name == "synthetic":
        return None
    return PROMPTS_DIR / f"{name}.json" if name in data.BENCHMARKS else Path(dataset) / "prompts.json"


def classnames_of(dataset) -> list[str]:
    """A dataset's class names in label order, without reading an image: the registry's for a
    benchmark, the synthetic set's, or your own folder's (its split.json, else its sub-folders)."""
    dataset = str(dataset)
    if dataset.lower() == "synthetic":
        return list(data.SYNTHETIC_LOOKS)
    if dataset.lower() in data.MEDICAL:
        return list(data.CLASSNAMES[dataset.lower()])
    if dataset.lower() in data.NATURAL:  # the split file's names, which the shipped text's keys are
        return list(read_json(PROMPTS_DIR / f"{dataset.lower()}.json")["classes"])
    if not Path(dataset).exists() and not any(c in dataset for c in ("/", os.sep, ".")):
        raise UserError(f"unknown dataset '{dataset}': {data.benchmarks_line()}, synthetic, "
                        "or the path to your own folder with one sub-folder per class")
    return data.folder_classnames(dataset)


def load_class_text(dataset: str, classnames: list[str], root: str = "data", method: str | None = None,
                    path=None) -> dict:
    """The class text of a dataset, checked for what `method` reads of it (a key of
    CLASS_TEXT_NEEDS; None: everything), restricted to `classnames` in that order.

    Benchmarks read prompts/<name>.json (a natural benchmark's keys are its class names with
    spaces for underscores, as the loader gives them), your own folder its prompts.json, synthetic
    its built-in text; `path` (the methods' --class-text FILE) is read instead when given. Warnings go to
    stderr; class keys are matched in Unicode NFC; a class without some sentences gets an empty
    list; a missing ctx_init is the template's words before its `{}`. `root` is accepted so
    callers can pass the arguments they gave load_splits.
    """
    own = own_text_path(dataset)
    if path:
        text, source = read_json(class_text_file(path)), str(path)
    elif own is None:
        text, source = data.synthetic_class_text(), "built-in synthetic text"
    elif not own.is_file():
        how = "" if is_benchmark(dataset) else (f" (python classtext.py write {dataset} --model MODEL has a language "
                                                f"model write it; python classtext.py starter {dataset} writes a "
                                                "starter to fill by hand)")
        raise UserError(f"this method needs class text but {own} does not exist: write it in the schema of "
                        f"prompts/*.json{how}")
    else:
        text, source = read_json(own), str(own)
    for warning in validate_class_text(text, source, method, classnames):
        print(f"warning: {warning}", file=sys.stderr)
    classes = {nfc(name): entry for name, entry in text["classes"].items()}
    ctx_init = text.get("ctx_init", template_prefix(text["template"]).strip())
    return {"template": text["template"], "ctx_init": ctx_init,
            "classes": {name: {field: list(classes[nfc(name)].get(field, []))
                               for field in TEXT_FIELDS} for name in classnames}}


def class_text_file(path) -> Path:
    """--class-text FILE, refused at once when it is not a file."""
    if not Path(path).is_file():
        raise UserError(f"--class-text {path} is not a file: give a class-text JSON file (python classtext.py "
                        "write or import makes one)")
    return Path(path)


def class_text_digest(path) -> str:
    """The SHA-256 (hex) of a file's bytes: for --class-text FILE, what keys its run folders and
    what metrics.json records."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None


def class_text_folder(path) -> str:
    """The run-folder level that keeps runs on other class text apart: "" for the dataset's own
    text, `text-` and the first 8 hex digits of the file's SHA-256 for --class-text FILE (run.sh
    computes the same), so runs on different text never share a folder."""
    return f"text-{class_text_digest(class_text_file(path))[:8]}" if path else ""



# ---------------------------------------------------------------- BiomedAP's prompt perturbations
# The fixed part of every prompt changed, for BiomedAP's robustness evaluation (biomedap.py's docstring).
PERTURBATIONS = ("clinical", "generic", "article", "minimal", "typo", "descriptive")


def typo_template(template, ctx_init, rate=0.2):
    """Substitute ~rate of the non-space characters of the fixed part (after ctx_init, class slot kept)."""
    head, tail = template[:len(ctx_init)], template[len(ctx_init):]
    slot = tail.index("{}")
    eligible = [i for i, ch in enumerate(tail)
                if not ch.isspace() and ch not in "{}" and not slot <= i < slot + 2]  # braces stay escaped
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



# ---------------------------------------------------------------- fitting the text tower

def _short(name: str) -> str:
    """A class name for a message: its two ends when it is long (the cut ones differ at the end)."""
    return name if len(name) <= 60 else f"{name[:28]}...{name[-28:]}"


def check_text_fits(backbone, class_text, classnames, fields) -> None:
    """Tokenise every sentence a method encodes (`fields`: "template" for the template with each
    class name, and lists of TEXT_FIELDS) as the text tower will, before any training.

    Text longer than the tower's context length is cut by its tokenizer: one warning names the
    classes and lengths. Classes that the cut (or the tokenizer's lower-casing) makes the same
    cannot be told apart: an error when their template prompts are the same ids, or their
    sentences in every field of `fields` the same set; a warning when one field of several is.
    `backbone`: anything with an open_clip `tokenizer` and the `pad_id` of its ids.
    """
    tokenizer, limit = backbone.tokenizer, backbone.tokenizer.context_length
    groups = {(name, field): [class_text["template"].format(name)] if field == "template"
              else list(class_text["classes"][name][field]) for name in classnames for field in fields}
    flat = [s for sentences in groups.values() for s in sentences]
    if not flat:
        return
    # No tokenizer makes more tokens than the text has bytes (after its clean-up), so the untruncated
    # ids fit in twice that; a sentence is cut when they are longer than the tower's context.
    full = tokenizer(flat, context_length=max(limit + 1, 2 * max(len(s.encode()) for s in flat) + 2))
    ids = tokenizer(flat, context_length=limit)  # (n, limit): what the tower reads
    lengths = ((full != backbone.pad_id).long() * torch.arange(1, full.shape[1] + 1)).amax(1).tolist()
    keys, cuts, start = {}, {}, 0  # keys: (class, field) -> its ids as a tuple, or a set of tuples
    for (name, field), sentences in groups.items():
        rows = [tuple(row) for row in ids[start:start + len(sentences)].tolist()]
        keys[name, field] = rows[0] if field == "template" else frozenset(rows)
        for i in range(start, start + len(sentences)):
            if lengths[i] > limit:
                cuts.setdefault(name, {}).setdefault(field, []).append(lengths[i])
        start += len(sentences)
    if cuts:
        listed = []
        for name, by_field in cuts.items():
            counts = ", ".join(field if field == "template" else f"{field} {len(n)}x" for field, n in by_field.items())
            listed.append(f"{_short(name)} ({counts}, up to {max(max(n) for n in by_field.values())} tokens)")
        print(f"warning: class text longer than the text tower's {limit} tokens is cut (the rest is not read) "
              f"in {len(listed)} class(es): {data.listed(listed)}",
              file=sys.stderr)

    def same(field_set):
        """Groups of two or more classes whose keys agree in every field of `field_set`."""
        by_key = {}
        for name in classnames:
            if all(keys[name, f] for f in field_set):  # a class without sentences is no match
                by_key.setdefault(tuple(keys[name, f] for f in field_set), []).append(name)
        return [names for names in by_key.values() if len(names) > 1]

    lists = [f for f in fields if f != "template"]
    problems = [f"classes {', '.join(map(_short, names))} have the same template prompt after tokenisation "
                f"({limit} tokens at most): the model cannot tell them apart; shorten or rename them"
                for names in (same(["template"]) if "template" in fields else [])]
    problems += [f"classes {', '.join(map(_short, names))} have the same {' and '.join(lists)} after tokenisation "
                 f"({limit} tokens at most): the model cannot tell them apart; write each its own"
                 for names in (same(lists) if lists else [])]
    if problems:
        raise UserError("\n".join(problems + [f"{len(problems)} problem(s) in the class text, listed above"]))
    for field in lists if len(lists) > 1 else []:  # one set of several shared: the others still differ
        for names in same([field]):
            print(f"warning: classes {', '.join(map(_short, names))} have the same {field} after tokenisation: those "
                  "do not tell them apart", file=sys.stderr)



# ---------------------------------------------------------------- the starter

def starter_class_text(classnames, template: str = DEFAULT_TEMPLATE) -> dict:
    """Class text with the template, an empty list per field and class, and a comment saying what
    each command reads: it loads for the zero-shot baseline as it is."""
    if (problem := template_problem(template)):
        raise UserError(problem)
    ref = REFERENCE_SENTENCES
    comment = [
        "Class text of this folder. Keys starting with _ are comments; the loader does not read them.",
        "template: the prompt, {} is where the class name goes (a literal brace is written {{ or }}). "
        "The zero-shot baseline needs only this.",
        "ctx_init (optional): the first words of the template, which BiomedAP learns as its context; "
        "left out, they are the words before {}.",
        "descriptions: sentences on how the class looks in these images. BiomedAP and BioMedVR need at "
        f"least one per class (the papers' text has {ref['descriptions']}); zero-shot also scores them "
        "when every class has some.",
        "distinctive: what sets the class apart from the others. BioMedVR needs at least one per class "
        f"(the papers' text has {ref['distinctive']}).",
        "confusions: what the class is mistaken for and how to tell them apart, each "
        f"{REFERENCE_CONFUSION_WORDS} words or more. BioMedVR needs at least one per class "
        f"(the papers' text has {ref['confusions']}).",
        "BioMedVR leaves out sentences shorter than 20 characters (its --min-chars).",
        "python classtext.py write FOLDER --model MODEL has a language model fill the lists; "
        "python classtext.py check FOLDER says what each command still needs.",
    ]
    return {"_comment": comment, "template": template,
            "classes": {name: {field: [] for field in TEXT_FIELDS} for name in classnames}}


def write_prompts_starter(folder, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write FOLDER/prompts.json for every class of the folder; never over an existing file."""
    text = starter_class_text(data.folder_classnames(folder), template)
    path = Path(folder) / "prompts.json"
    try:
        with open(path, "x", encoding="utf-8") as file:  # "x": fails if the file exists, even in a race
            file.write(json.dumps(text, indent=2, ensure_ascii=False) + "\n")
    except FileExistsError:
        raise UserError(f"{path} already exists: edit it, or move it away to write a new starter") from None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


# ---------------------------------------------------------------- one sentence's checks
# Words per sentence: the papers' confusions have 20 or more; the upper bounds keep a sentence
# inside the 77 tokens of OpenAI CLIP's text tower.
SENTENCE_WORDS = {"descriptions": (5, 40), "distinctive": (5, 40), "confusions": (REFERENCE_CONFUSION_WORDS, 50)}
MIN_CHARS = 20  # BioMedVR leaves out shorter attribute sentences (its --min-chars)
REFUSAL = re.compile(r"\b(?:i can ?not|i can['’]?t|i['’]?m (?:sorry|unable|not able)|"
                     r"i am (?:sorry|unable|not able)|as an ai\b|language model|cannot (?:help|assist|provide)|"
                     r"consult (?:a|your) (?:doctor|physician|radiologist|medical))", re.IGNORECASE)
_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*•–])\s+")  # "1.", "2)", "(3)", "-", "*", "•" before a sentence


def clean_sentence(line: str) -> str:
    """A line of an answer as a sentence: its number or bullet, markdown emphasis and the quotes
    around it removed, spaces collapsed."""
    text = " ".join(_MARKER.sub("", line).replace("**", "").split())
    if len(text) > 1 and text[0] in "\"'“‘" and text[-1] in "\"'”’":
        text = text[1:-1].strip()
    return text


def sentence_key(sentence: str) -> str:
    """What two sentences share when one repeats the other: their words, in lower case."""
    return " ".join(re.findall(r"\w+", nfc(sentence).casefold()))


def sentence_problem(sentence: str, field: str) -> str | None:
    """Why `write` would not keep `sentence` in `field`, in a few words (the reasons it counts), or
    None. Repeats are found by the caller, which knows the other sentences."""
    low, high = SENTENCE_WORDS[field]
    words = len(sentence.split())
    if REFUSAL.search(sentence):
        return "refusal"
    if "{" in sentence or "}" in sentence:  # a template's slot echoed back: not a description
        return "braces"
    if sentence.endswith(":") or not any(c.isalpha() for c in sentence):
        return "not a sentence"
    if words < low or len(sentence) < MIN_CHARS:
        return f"under {low} words"
    if words > high:
        return f"over {high} words"
    return None


# ---------------------------------------------------------------- writing with a language model
DEFAULT_COUNTS = {"descriptions": 50, "distinctive": 5, "confusions": 5}  # BiomedCoOp: 50; BioMedVR: 5, 5
TEMPERATURE = 0.7  # BioMedVR's released generator (gen_confuse.py)
# Our prompts. They carry what the papers asked of theirs: descriptions of how the class looks in
# this modality and body part (the template says both), traits against the other classes (named),
# confusions of 20+ words describing a look-alike that is not the class, named. A request is the
# system prompt, then "dataset", the field's prompt, "written" (sentences the class already has),
# and the answer format; {placeholders} are filled per class. A written file records them all.
PROMPTS = {
    "system": "You are a radiologist and medical imaging expert. You write reference sentences for an image "
              "classifier that compares each image with sentences about its possible classes. Every sentence "
              "describes what can be seen in the image: shape, size, position, margins, texture, brightness or "
              "signal, and patterns. Never patient history, symptoms, treatment or advice. Each sentence stands "
              "alone, is in English and says something the others do not.",
    "dataset": 'The images of this dataset are captioned like "{caption}", with one caption per class. '
               "The classes are {classes}.",
    "descriptions": 'Write {n_sentences} describing how "{classname}" looks in these images, in this imaging '
                    "modality and body part: its typical visual findings, one finding or pattern per sentence, "
                    "each sentence 8 to 30 words.",
    "distinctive": 'Write {n_sentences} on what sets "{classname}" apart from the other classes ({others}) in '
                   'these images: each names a visible trait of "{classname}" that the others lack, or compares '
                   "it with one named other class, each sentence 8 to 30 words.",
    "confusions": 'Write {n_sentences}, each describing an appearance in these images that is easily mistaken '
                  'for "{classname}" but is not it: a look-alike (one of {others}, or another condition or '
                  "artefact of this imaging) named in the sentence, the visual detail that makes the two look "
                  "alike, and the detail that tells them apart. Each sentence has 20 to 40 words.",
    "written": "These sentences are already written; do not repeat or rephrase them:\n{written}",
    "json": 'Answer with a JSON object whose "sentences" list holds the {n_sentences}, and nothing else.',
    "lines": "Answer with a numbered list, one sentence per line (1. ..., 2. ...), and nothing else.",
}
ANSWER_FORMAT = {"type": "json_schema", "json_schema": {  # structured answers, where the server has them
    "name": "sentences", "strict": True,
    "schema": {"type": "object", "properties": {"sentences": {"type": "array", "items": {"type": "string"}}},
               "required": ["sentences"], "additionalProperties": False}}}
OPENAI_URL = "https://api.openai.com/v1"
CONNECT_TIMEOUT = 5.0  # seconds: a server that does not answer the connection is said at once
TRIES = {"timeout": 2, "server": 3, "rate": 6}  # requests before an error ends the session
MAX_WAIT = 120.0  # seconds: a server asking to wait longer ends the session


def messages_for(field, classname, classnames, template, count, written, json_schema) -> list[dict]:
    """The chat messages that ask for `count` sentences of `field` for `classname` (`written`: its
    sentences so far, not to be repeated)."""
    n_sentences = f"{count} sentence{'s' if count != 1 else ''}"
    quoted = [f'"{name}"' for name in classnames]
    parts = [PROMPTS["dataset"].format(caption=template.format(classname), classes=", ".join(quoted)),
             PROMPTS[field].format(n_sentences=n_sentences, classname=classname,
                                   others=", ".join(q for q, name in zip(quoted, classnames) if name != classname))]
    if written:
        parts.append(PROMPTS["written"].format(written="\n".join(f"- {s}" for s in written)))
    parts.append(PROMPTS["json" if json_schema else "lines"].format(n_sentences=n_sentences))
    return [{"role": "system", "content": PROMPTS["system"]}, {"role": "user", "content": "\n\n".join(parts)}]


def request_body(model, temperature, messages, json_schema) -> dict:
    """The Chat Completions request, as sent (and as --dry-run prints it)."""
    body = {"model": model, "temperature": temperature, "messages": messages}
    if json_schema:
        body["response_format"] = ANSWER_FORMAT
    return body


def parse_answer(content: str) -> list[str]:
    """The sentences of an answer: the "sentences" of a JSON object (or a JSON list); the complete
    strings of JSON cut short or malformed; else one per non-empty line (numbered, bulleted or not)."""
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    text = fenced[1] if fenced else text
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        lists = [v for v in answer.values() if isinstance(v, list)]
        answer = answer.get("sentences", lists[0] if len(lists) == 1 else None)
    if isinstance(answer, list):
        return [s for s in answer if isinstance(s, str)]
    if text[:1] in ("{", "["):  # JSON cut short (the answer hit a length limit) or malformed
        sentences = []
        for string_ in re.finditer(r'"(?:[^"\\\n]|\\.)*"', text):  # whole strings, left to right
            if not re.match(r"\s*:", text[string_.end():]):  # a key is not a sentence
                try:
                    sentences.append(json.loads(string_[0]))
                except ValueError:
                    pass
        return sentences
    return [line for line in text.splitlines() if line.strip()]


def server_url(base_url) -> str:
    """--base-url, else OPENAI_BASE_URL, else OpenAI's; an http(s) URL with a host."""
    url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--base-url {url} is not an http(s) URL: give the server's API root, e.g. "
                        "http://127.0.0.1:11434/v1 (Ollama) or http://127.0.0.1:8000/v1 (vLLM)")
    return url


def server_host(url) -> str:
    """The host (and port) of a server URL, without any user name or password in it: what is recorded."""
    return urlsplit(url).netloc.rpartition("@")[2]


def is_local(url) -> bool:
    """A server on this machine or the local network (localhost, a loopback, private or link-local
    address, a name without dots): such servers (vLLM, Ollama, llama.cpp, LM Studio) need no key."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith((".localhost", ".local")) or "." not in host and ":" not in host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_link_local


def api_key(url) -> str:
    """OPENAI_API_KEY; a local server takes a placeholder when it is not set."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if is_local(url):
        return "none"
    raise UserError(f"no API key: set OPENAI_API_KEY for {server_host(url)} (a server on this machine or the "
                    "local network needs none: pass its --base-url, e.g. http://127.0.0.1:11434/v1)")


def make_client(url, key, timeout):
    """The official client, without its own retries (the session retries, sharing a rate limit's
    wait between its threads), a short connection timeout and `timeout` seconds for an answer."""
    try:
        import openai
    except ImportError:
        raise UserError("writing class text needs the openai package: pip install openai") from None
    return openai.OpenAI(api_key=key, base_url=url, max_retries=0,
                         timeout=openai.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)))


def retry_after(error) -> float | None:
    """The seconds a refusing server asks to wait (retry-after-ms or retry-after), or None."""
    headers = error.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            try:
                return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                pass
    return None


def server_message(error) -> str:
    """What the server said in an error answer, on one line."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return " ".join(body["message"].split())
    if isinstance(body, str) and body.strip():
        return " ".join(body.split())[:300]
    return one_line(error)


class Fatal(Exception):
    """An error that ends a `write` session, in one line; what was written is kept."""


class _Stopped(Exception):
    """The session is ending (an error in another thread, or Ctrl-C): a worker leaves."""


class _NoSchema(Exception):
    """The server refused the JSON schema: ask again for numbered lines."""


class Writing:
    """One `write` session: it fills the fields of `names` in `text` (the whole file, saved
    atomically to `path` after every answer that added a sentence) up to `counts`, `jobs` classes
    at a time. Every change to the text, its save and the shared counters hold `lock`."""

    def __init__(self, path, text, names, classnames, counts, url, key, args, record):
        self.path, self.text, self.names, self.classnames, self.counts = path, text, names, classnames, counts
        self.url, self.key, self.args, self.record = url, key, args, record
        self.client = make_client(url, key, args.timeout)
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.not_before = 0.0  # no request before this time.monotonic(): a rate limit's wait, for every thread
        self.json_schema = True
        self.requests = self.added = self.prompt_tokens = self.completion_tokens = self.uncounted = 0
        self.short, self.failure = [], None
        self.seen = {sentence_key(s) for entry in text["classes"].values() if isinstance(entry, dict)
                     for field in TEXT_FIELDS for s in entry.get(field, [])}
        total = sum(max(0, counts[f] - len(text["classes"][n][f])) for n in names for f in TEXT_FIELDS)
        self.bar = tqdm(total=total, unit="sentence", desc=f"writing {path.name}", disable=None, file=sys.stderr)

    # -- the threads
    def run(self):
        """Fill every class, `--jobs` at a time; Ctrl-C stops at once, a save under way completes first."""
        todo = queue.SimpleQueue()
        for name in self.names:
            todo.put(name)

        def worker():
            while not self.stop.is_set():
                try:
                    name = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    for field in TEXT_FIELDS:
                        self.fill(name, field)
                except _Stopped:
                    return
                except BaseException as error:  # a Fatal (or a bug): the main thread raises it
                    with self.lock:
                        self.failure = self.failure or error
                    self.stop.set()
                    return
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.args.jobs, len(self.names)))]
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads) and not self.stop.wait(0.1):
                pass
        except KeyboardInterrupt:
            self.stop.set()
        finally:
            # From here on no save starts and one under way has finished: threads still waiting for the
            # server are left behind (they end with the process), their answers unused.
            self.lock.acquire()
            self.bar.close()
        if self.failure is not None:
            raise self.failure
        if any(thread.is_alive() for thread in threads):
            raise KeyboardInterrupt

    # -- one class's field
    def fill(self, name, field):
        """Ask for the sentences `field` of class `name` lacks; re-ask for what an answer fell short
        of, --reasks times; then note one line naming the class, the field and what is missing."""
        have, want = self.text["classes"][name][field], self.counts[field]
        reasons = Counter()
        for _ in range(1 + self.args.reasks):
            if len(have) >= want:
                return
            sentences, reasons = self.ask(name, field, want - len(have), list(have))
            reasons += self.keep(name, field, sentences, want - len(have))
        if len(have) < want:
            why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "no sentences"
            self.short.append(f'class "{name}": {field}: {want - len(have)} of {want} missing after '
                              f"{1 + self.args.reasks} requests (the last answer: {why}); run the same command "
                              "again to ask for them")

    def ask(self, name, field, count, written) -> tuple[list[str], Counter]:
        """The sentences of one answer, and why it had none (a refusal, nothing readable)."""
        while True:
            json_schema = self.json_schema
            body = request_body(self.args.model, self.args.temperature,
                                messages_for(field, name, self.classnames, self.text["template"], count, written,
                                             json_schema), json_schema)
            try:
                response = self.send(body)
                break
            except _NoSchema:
                with self.lock:
                    self.json_schema, self.record["answers"] = False, "numbered lines"
        message = response.choices[0].message if response.choices else None
        content = (message.content if message else None) or ""
        if message is not None and getattr(message, "refusal", None):
            return [], Counter(["refusal"])
        sentences = parse_answer(content)
        return sentences, Counter() if sentences else Counter(["refusal" if REFUSAL.search(content) else
                                                                "answer without sentences"])

    def keep(self, name, field, sentences, missing) -> Counter:
        """Add an answer's usable sentences (at most `missing`) to the class's field and save the file;
        returns how many were left out, by reason."""
        reasons, kept = Counter(), []
        with self.lock:
            for raw in sentences:
                sentence = clean_sentence(raw)
                problem = sentence_problem(sentence, field) if sentence else "empty"
                if problem is None and sentence_key(sentence) in self.seen:
                    problem = "repeats"  # of this class or another: a repeat tells no class apart
                if problem is None and len(kept) == missing:
                    continue  # more than asked for
                if problem:
                    reasons[problem] += 1
                    continue
                kept.append(sentence)
                self.seen.add(sentence_key(sentence))
            if kept:
                self.text["classes"][name][field].extend(kept)
                self.added += len(kept)
                self.record["sentences"] = self.record.get("sentences", 0) + len(kept)
                save_text(self.path, self.text)
                self.bar.update(len(kept))
        return reasons

    # -- one request
    def send(self, body):
        """The server's answer to one request. Timeouts, server errors (5xx, 408, 409) and rate limits
        (429) are retried, waiting what the server asks (retry-after) in every thread; an error no
        retry mends raises Fatal with one line."""
        import openai
        tries = Counter()
        while True:
            self.wait_turn()
            with self.lock:
                self.requests += 1
                self.record["requests"] = self.record.get("requests", 0) + 1
            try:
                response = self.client.chat.completions.create(**body)
            except openai.APITimeoutError:
                tries["timeout"] += 1
                if tries["timeout"] >= TRIES["timeout"]:
                    raise Fatal(f"{server_host(self.url)} gave no answer within {self.args.timeout:g} s, "
                                f"{TRIES['timeout']} times: raise --timeout (a local model can take minutes for "
                                "50 sentences)") from None
                continue
            except openai.APIConnectionError as error:
                cause = one_line(error.__cause__) if error.__cause__ else one_line(error)
                raise Fatal(f"cannot reach the server {self.url} ({self.redact(cause)}): is it running, and is "
                            "--base-url right?") from None
            except openai.APIStatusError as error:
                self.hold(self.status_wait(error, body, tries))
                continue
            except openai.OpenAIError as error:
                raise Fatal(f"the answer of {self.url} was not understood ({self.redact(one_line(error))})") from None
            usage = getattr(response, "usage", None)
            with self.lock:
                if usage is None or usage.prompt_tokens is None:
                    self.uncounted += 1
                else:
                    self.prompt_tokens += usage.prompt_tokens
                    self.completion_tokens += usage.completion_tokens or 0
            return response

    def status_wait(self, error, body, tries) -> float:
        """The seconds to wait before retrying an error answer; raises Fatal (or _NoSchema) when a
        retry would not help."""
        status, message = error.status_code, self.redact(server_message(error))
        said, model = f"HTTP {status}: {message}", self.args.model
        quota = error.code == "insufficient_quota" or "quota" in message.lower()
        if status == 429 and not quota:
            tries["rate"] += 1
            if tries["rate"] >= TRIES["rate"]:
                raise Fatal(f"the server's rate limit refused {TRIES['rate']} requests in a row ({said}): lower "
                            "--jobs, or run again later")
            wait = retry_after(error)
            wait = min(2.0 ** tries["rate"], 60.0) if wait is None else wait
            if wait > MAX_WAIT:
                raise Fatal(f"the server's rate limit asks to wait {wait:.0f} s ({said}): run again later")
            return wait
        if status in (408, 409) or status >= 500:
            tries["server"] += 1
            if tries["server"] >= TRIES["server"]:
                raise Fatal(f"the server failed {TRIES['server']} times in a row ({said})")
            wait = retry_after(error)
            return min(2.0 ** (tries["server"] - 1), MAX_WAIT) if wait is None else min(wait, MAX_WAIT)
        if status == 429:
            raise Fatal(f"the account has no quota left ({said})")
        if status in (401, 403):
            raise Fatal(f"the server refused the API key ({said}): set OPENAI_API_KEY to a key for "
                        f"{server_host(self.url)}")
        if re.search(r"context|too long|too many tokens|maximum.*tokens", message, re.IGNORECASE) or \
                error.code == "context_length_exceeded":
            raise Fatal(f"the request is longer than the model's context ({said}): ask for fewer sentences "
                        "(--descriptions), or use a model with a longer context")
        if re.search(r"\bmodel\b", message, re.IGNORECASE) and (status == 404 or re.search(
                r"not found|does not exist|unknown|no such", message, re.IGNORECASE)):
            raise Fatal(f"the server does not know the model {model!r} ({said}): check --model")
        if status == 404:
            raise Fatal(f"no Chat Completions API at {self.url}/chat/completions ({said}): check --base-url "
                        "(most servers end in /v1)")
        if "response_format" in body and re.search(r"response_format|json|schema|structured", message,
                                                    re.IGNORECASE):
            raise _NoSchema
        raise Fatal(f"the server refused the request ({said})")

    def hold(self, seconds):
        """No thread sends a request for `seconds` from now."""
        with self.lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)

    def wait_turn(self):
        while True:
            if self.stop.is_set():
                raise _Stopped
            with self.lock:
                left = self.not_before - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 0.5))

    def redact(self, text: str) -> str:
        """`text` without the API key or anything shaped like one (servers quote keys they refuse)."""
        if len(self.key) >= 4:
            text = text.replace(self.key, "***")
        return re.sub(r"sk-[\w*.-]{4,}", "sk-***", text)

    def tokens(self) -> str:
        if not self.prompt_tokens and not self.completion_tokens:
            return "tokens: not counted by the server"
        line = f"tokens: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion"
        return line + (f" ({self.uncounted} answers without a count)" if self.uncounted else "")


def save_text(path, text):
    """Write class text atomically (a temporary file beside it, then a rename): an interrupted write
    leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(text, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writing_lock(path):
    """One command at a time writes a class-text file (the lock lives in the temporary folder)."""
    name = hashlib.sha1(str(Path(path).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    lock = FileLock(Path(tempfile.gettempdir()) / f"medvl-text-{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"another command is writing {path} right now: wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def target_path(dataset, out=None) -> Path:
    """The file `write` and `import` write: --out FILE, else your own folder's prompts.json; the
    shipped prompts/ are never written."""
    if out:
        path = Path(out)
        if path.resolve().parent == PROMPTS_DIR.resolve():
            raise UserError(f"--out {out} is in prompts/, the shipped class text, which no command overwrites: "
                            "give a file elsewhere")
        if path.is_dir():
            raise UserError(f"--out {out} is a folder: give a file name, e.g. {Path(out) / 'prompts.json'}")
        return path
    if is_benchmark(dataset):
        raise UserError(f"{dataset} is a benchmark: its class text in prompts/ is never overwritten; pass --out "
                        f"FILE, then run the methods on it with --class-text FILE")
    return own_text_path(dataset)


def target_text(path, dataset, classnames, template=None) -> tuple[dict, list[str]]:
    """The class text `write` and `import` add to, with an entry for every class, and the keys of
    the dataset's classes in it (in label order). It is the file at `path` as it is; else your own
    folder's prompts.json (your sentences are kept); else a starter with the dataset's template
    (a benchmark's shipped sentences are not copied: the new file is another text)."""
    own = own_text_path(dataset)
    if path.is_file():
        text = read_json(path)
    elif own is not None and own.is_file() and not is_benchmark(dataset):
        text = read_json(own)
    else:
        base = data.synthetic_class_text() if own is None else read_json(own) if own.is_file() else {}
        text = starter_class_text(classnames, template or base.get("template", DEFAULT_TEMPLATE))
        if "ctx_init" in base and text["template"] == base["template"]:
            text["ctx_init"] = base["ctx_init"]
    validate_class_text(text, str(path), "zeroshot")  # the schema: the lists may still be empty
    if template is not None and text["template"] != template:
        raise UserError(f"{path} has the template {text['template']!r}: change it there, or leave out --template")
    keys = {nfc(key): key for key in text["classes"]}
    names = [keys.get(nfc(name), name) for name in classnames]
    for name in names:
        entry = text["classes"].setdefault(name, {})
        for field in TEXT_FIELDS:
            entry.setdefault(field, [])
    return text, names


def add_record(text, record: dict) -> dict:
    """Append how this command changed the file to its "_" list (kept as the first key); returns
    the record, which the session keeps up to date."""
    before = text.pop("_", None)
    records = before if isinstance(before, list) else [] if before is None else [before]
    new = {"_": records + [record], **text}
    text.clear()
    text.update(new)
    return record


def print_requests(work, text, classnames, args, url):
    """--dry-run: every first request, exactly as it would be sent; nothing is sent."""
    print(f"dry run: {len(work)} request(s) to {url}/chat/completions, model {args.model}; more if answers fall "
          f"short (up to {args.reasks} re-asks each). They carry the class names, the template and the counts; "
          "no image. Nothing is sent.")
    for i, (name, field, count) in enumerate(work, 1):
        messages = messages_for(field, name, classnames, text["template"], count, text["classes"][name][field], True)
        print(f"--- request {i} of {len(work)}: class \"{name}\", {count} {field}")
        print(json.dumps(request_body(args.model, args.temperature, messages, True), indent=2, ensure_ascii=False))


def write(args) -> int:
    """`write`: fill every class's lists up to the counts; 0 when all are full, 1 when some answers
    fell short (one line each), 130 on Ctrl-C."""
    counts = {field: getattr(args, field) for field in TEXT_FIELDS}
    classnames = classnames_of(args.dataset)
    path, url = target_path(args.dataset, args.out), server_url(args.base_url)
    with writing_lock(path) if not args.dry_run else nullcontext():
        text, names = target_text(path, args.dataset, classnames, args.template)
        if args.overwrite:
            for name in names:
                text["classes"][name].update({field: [] for field in TEXT_FIELDS if counts[field]})
        work = [(name, field, counts[field] - len(text["classes"][name][field]))
                for name in names for field in TEXT_FIELDS if counts[field] > len(text["classes"][name][field])]
        if text["template"] == DEFAULT_TEMPLATE and work:
            print(f'note: the template "{DEFAULT_TEMPLATE}" names no modality or body part, so the text will not '
                  "either: give one such as \"a MR photo of a {} in the brain.\" (--template, or edit "
                  f"{path})", file=sys.stderr)
        if args.dry_run:
            print_requests(work, text, names, args, url)
            return 0
        if not work:
            print(f"nothing to ask: every class in {path} has "
                  f"{', '.join(f'{n} {field}' for field, n in counts.items())}; no request sent")
            return 0
        key = api_key(url)
        if args.overwrite and path.is_file():
            shutil.copyfile(path, path.with_name(path.name + ".bak"))
            print(f"--overwrite: the previous text is kept in {path.name}.bak", file=sys.stderr)
        import openai
        record = add_record(text, {
            "command": "write", "model": args.model, "server": server_host(url), "temperature": args.temperature,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "openai": openai.__version__,
            "answers": "json schema", "counts": counts, "prompts": PROMPTS, "answer_format": ANSWER_FORMAT})
        save_text(path, text)
        session = Writing(path, text, list(dict.fromkeys(name for name, _, _ in work)), names, counts, url, key,
                          args, record)
        start = time.perf_counter()
        try:
            session.run()
        except KeyboardInterrupt:
            print(f"interrupted: the {session.added} sentence(s) written are kept in {path}; run the same command "
                  "again to ask only for what is missing", file=sys.stderr)
            return 130
        except Fatal as error:
            raise UserError(f"{error}; the {session.added} sentence(s) written so far are kept in {path}") from None
        finally:
            save_text(path, text)  # the record's last counts (the session's lock is held: no thread writes)
    print(f"wrote {path}: {session.added} sentence(s) for {len(session.names)} class(es) in {session.requests} "
          f"request(s), {time.perf_counter() - start:.1f} s; {session.tokens()}")
    for line in session.short:
        print(f"missing: {line}", file=sys.stderr)
    return 1 if session.short else 0


# ---------------------------------------------------------------- import

def match_key(name) -> str:
    """A class name as released files and folders may spell it: Unicode NFC, underscores as spaces,
    case and spacing ignored."""
    return " ".join(nfc(str(name)).replace("_", " ").casefold().split())


def read_released(path, field) -> dict[str, list[str]]:
    """{class key: sentences} of a released attribute file, {class: [sentences]}: BioMedVR's
    *_des.json, *_dist.json and *_confuse.json, BiomedCoOp's description files."""
    released = read_json(path, f"--{field} file")
    if not isinstance(released, dict) or not released:
        raise UserError(f"--{field} {path} must be a JSON object {{class: [sentences]}}")
    bad = [key for key, value in released.items()
           if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(s, str) for s in value))]
    if bad:
        raise UserError(f"--{field} {path}: the value of {', '.join(map(repr, bad[:5]))} is not a list of sentences "
                        "(the format is {class: [sentences]})")
    return {key: [value] if isinstance(value, str) else value for key, value in released.items()}


def import_text(args) -> int:
    """`import`: released attribute files into the dataset's class text, written as `write` writes."""
    files = {field: getattr(args, field) for field in TEXT_FIELDS if getattr(args, field)}
    if not files:
        raise UserError("give at least one of --descriptions FILE, --distinctive FILE, --confusions FILE")
    classnames = classnames_of(args.dataset)
    renames = {}
    for pair in args.rename:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise UserError(f"--rename {pair!r}: write it OLD=NEW, e.g. --rename 'no tumor=normal brain'")
        renames[match_key(old)] = new
    wanted = {match_key(name): name for name in classnames}
    problems, found = [], {}
    for field, file in files.items():
        found[field], unmatched = {}, []
        for key, sentences in read_released(file, field).items():
            name = wanted.get(match_key(renames.get(match_key(key), key)))
            if name is None:
                unmatched.append(key)
            elif name in found[field]:
                problems.append(f"--{field} {file}: two keys are the class {name!r}: merge them")
            else:
                found[field][name] = sentences
        if unmatched:
            problems.append(f"--{field} {file}: no class of {args.dataset} matches {', '.join(map(repr, unmatched))}")
    if problems:
        raise UserError("\n".join(problems + [f"the classes of {args.dataset} are {', '.join(map(repr, classnames))}: "
                                              "rename the keys in the file, or map them with --rename 'OLD=NEW'"]))
    path = target_path(args.dataset, args.out)
    lines = []
    with writing_lock(path):
        text, names = target_text(path, args.dataset, classnames, args.template)
        for field, by_class in found.items():
            added = left_out = 0
            for name, key in zip(classnames, names):
                entry = text["classes"][key]
                if args.overwrite:
                    entry[field] = []
                seen = {sentence_key(s) for s in entry[field]}
                for sentence in map(" ".join, map(str.split, by_class.get(name, []))):
                    if not sentence or sentence_key(sentence) in seen:
                        left_out += 1
                        continue
                    entry[field].append(sentence)
                    seen.add(sentence_key(sentence))
                    added += 1
            lines.append(f"{field}: {added} sentence(s) for {len(by_class)} class(es) from {files[field]}"
                         + (f", {left_out} empty or repeated left out" if left_out else ""))
            missing = [name for name in classnames if name not in by_class]
            if missing:
                print(f"warning: {files[field]} has no {field} for {', '.join(map(repr, missing))}: their lists "
                      "stay as they were", file=sys.stderr)
        add_record(text, {"command": "import", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "files": {field: {"name": Path(file).name, "sha256": class_text_digest(file)}
                                    for field, file in files.items()}})
        save_text(path, text)
    print("\n".join(lines))
    again = f" --class-text {path}" if args.out else ""
    print(f"wrote {path}; python classtext.py check {args.dataset}{again} says what each command can run on")
    return 0


# ---------------------------------------------------------------- check

def sentence_warnings(classes, classnames) -> list[str]:
    """One line per class and field with sentences `write` would not have kept, and one per
    sentence given to several classes (it tells none of them apart)."""
    lines, owners = [], {}
    for name in classnames:
        entry = classes.get(nfc(name), {})
        for field in TEXT_FIELDS:
            sentences = entry.get(field, []) if isinstance(entry.get(field, []), list) else []
            reasons = Counter(sentence_problem(s, field) for s in sentences if isinstance(s, str))
            reasons.pop(None, None)
            reasons.pop(f"under {REFERENCE_CONFUSION_WORDS} words" if field == "confusions" else "", None)
            if reasons:
                lines.append(f'class "{name}": {field}: ' + ", ".join(f"{n} {why}" for why, n in reasons.items()))
            for s in sentences:
                if isinstance(s, str):
                    owners.setdefault(sentence_key(s), (s, []))[1].append(name)
    lines += [f"the same sentence in classes {', '.join(map(repr, dict.fromkeys(names)))}: {s[:80]!r}"
              for s, names in owners.values() if len(set(names)) > 1]
    return lines


def check(args) -> int:
    """`check`: per class and field the counts, what each command needs, what the text tower cuts
    (with --backbone), and every problem at once. 0 when every command can run on the text, 1 when
    one cannot (the problems say why)."""
    classnames = classnames_of(args.dataset)
    path = class_text_file(args.class_text) if args.class_text else own_text_path(args.dataset)
    if path is None:
        text, source = data.synthetic_class_text(), "built-in synthetic text"
    elif not path.is_file():
        raise UserError(f"{path} does not exist: python classtext.py write or starter makes it")
    else:
        text, source = read_json(path), str(path)
    if not isinstance(text, dict):
        raise UserError(f'class text {source}: the top level must be an object with "template" and "classes"')
    classes = text.get("classes") if isinstance(text.get("classes"), dict) else {}
    classes = {nfc(name): entry if isinstance(entry, dict) else {} for name, entry in classes.items()}

    def cell(name, field):  # the number of sentences, "-" for a class without an entry, "?" for a non-list
        entry = classes.get(nfc(name))
        return "-" if entry is None else len(entry.get(field, [])) if isinstance(entry.get(field, []), list) else "?"
    width = max(len(_short(name)) for name in [*classnames, "the papers' text"])
    print(f"class text {source}: template {text.get('template')!r}"
          + (f", ctx_init {text['ctx_init']!r}" if "ctx_init" in text else ""))
    print(f"{'':{width}}  " + "  ".join(f"{field:>12}" for field in TEXT_FIELDS))
    for name in classnames:
        print(f"{_short(name):{width}}  " + "  ".join(f"{cell(name, field):>12}" for field in TEXT_FIELDS))
    print(f"{'the papers' + chr(39) + ' text':{width}}  "
          + "  ".join(f"{REFERENCE_SENTENCES[field]:>12}" for field in TEXT_FIELDS))

    problems, warnings, verdicts = [], [], {}
    prefix = f"class text {source}: "
    for method, reader in COMMAND_NAMES.items():
        try:
            warnings += [w.removeprefix(prefix) for w in validate_class_text(text, source, method, classnames)]
            verdicts[method] = f"{reader}: ready"
        except UserError as error:
            own = [line.removeprefix(prefix) for line in str(error).splitlines()[:-1]]
            problems += [line for line in own if line not in problems]
            verdicts[method] = f"{reader}: not ready ({len(own)} problem(s) below)"
    if verdicts["zeroshot"].endswith("ready"):
        described = all(cell(name, "descriptions") not in (0, "-", "?") for name in classnames)
        verdicts["zeroshot"] += (" (it scores the descriptions too)" if described else
                                 " (the template only: not every class has descriptions)")
    warnings = list(dict.fromkeys(warnings)) + sentence_warnings(classes, classnames)

    lines = list(verdicts.values())
    if not args.backbone:
        lines.append("text tower: pass --backbone NAME to see what its context length cuts")
    elif verdicts["zeroshot"].startswith(f"{COMMAND_NAMES['zeroshot']}: ready"):  # the schema holds: tokenise it
        backbone = load_backbone(args.backbone, "cpu")
        loaded = {"template": text["template"],
                  "classes": {name: {field: list(classes.get(nfc(name), {}).get(field, [])) for field in TEXT_FIELDS}
                              for name in classnames}}
        said = io.StringIO()
        for method, fields in CLASS_TEXT_ENCODES.items():
            try:
                with redirect_stderr(said):
                    check_text_fits(backbone, loaded, classnames, fields)
            except UserError as error:
                problems += [f"{COMMAND_NAMES[method]}: {line}" for line in str(error).splitlines()[:-1]]
        said = list(dict.fromkeys(line.removeprefix("warning: ") for line in said.getvalue().splitlines()))
        warnings += said
        cut = any("is cut" in line for line in said)
        lines.append(f"text tower of {args.backbone} ({backbone.tokenizer.context_length} tokens): "
                     + ("some text is cut (warnings below)" if cut else "nothing is cut"))
    print("\n".join(lines))
    for title, listed in (("warnings", warnings), ("problems", problems)):
        if listed:
            print(f"{title} ({len(listed)}):\n" + "\n".join(f"  {line}" for line in listed))
    return 1 if problems else 0


# ---------------------------------------------------------------- the command line

def _number(kind, low, what):
    """An argparse type: a `kind` number >= `low`; anything else is one line saying `what` it must be."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= low:  # NaN is not >= anything
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value
    return parse


def build_parser() -> OneLineParser:
    """The command line: write, starter, import, check."""
    parser = OneLineParser(prog="python classtext.py", description="The class text of a dataset: write it with "
                           "a language model, start it by hand, import released attribute files, check it.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    target = dict(metavar="FOLDER|DATASET", help="your own folder (one sub-folder per class), or a benchmark name "
                                                 "(then --out FILE: the shipped prompts/ are never written)")
    count = _number(int, 0, "a whole number >= 0")

    write_ = commands.add_parser(
        "write", help="have a language model write the class text",
        description="Fill every class's descriptions, distinctive and confusions with sentences written by a "
                    "language model on an OpenAI-compatible server (OpenAI, Azure, vLLM, Ollama, llama.cpp, "
                    "LM Studio), through the openai package. Sent: the class names, the template, the counts and "
                    "a class's sentences so far; never an image. The key is OPENAI_API_KEY (a local server needs "
                    "none). Resumable: each answer is saved at once; a rerun asks only for what is missing.")
    write_.add_argument("dataset", **target)
    write_.add_argument("--model", required=True, help="the model's name on the server, e.g. gpt-4o or llama3.1")
    write_.add_argument("--base-url", metavar="URL", help="the server's API root, e.g. http://127.0.0.1:11434/v1 "
                        "(default: OPENAI_BASE_URL, else https://api.openai.com/v1)")
    write_.add_argument("--out", metavar="FILE", help="write FILE (default: FOLDER/prompts.json)")
    write_.add_argument("--template", help="for a new file: the prompt, {} for the class name, e.g. "
                        "'a MR photo of a {} in the brain.' (it tells the model the modality and body part)")
    for field in TEXT_FIELDS:
        write_.add_argument(f"--{field}", type=count, default=DEFAULT_COUNTS[field], metavar="N",
                            help=f"{field} per class (default: {DEFAULT_COUNTS[field]})")
    write_.add_argument("--temperature", type=_number(float, 0, "a number >= 0"), default=TEMPERATURE, metavar="T",
                        help=f"sampling temperature (default: {TEMPERATURE}, BioMedVR's generator)")
    write_.add_argument("--jobs", type=_number(int, 1, "a whole number >= 1"), default=4, metavar="N",
                        help="classes asked for at the same time (default: 4)")
    write_.add_argument("--reasks", type=count, default=3, metavar="N",
                        help="requests again for what an answer fell short of (default: 3)")
    write_.add_argument("--timeout", type=_number(float, 0.01, "a number of seconds > 0"), default=300.0,
                        metavar="SECONDS", help="for one answer (default: 300)")
    write_.add_argument("--overwrite", action="store_true", help="replace the sentences already there (the old "
                        "file is kept as FILE.bak)")
    write_.add_argument("--dry-run", action="store_true", help="print every request; send nothing")

    starter = commands.add_parser(
        "starter", help="write a starter prompts.json to fill by hand",
        description="Write FOLDER/prompts.json: the template and, for every class of the folder, empty lists of "
                    "descriptions, distinctive and confusions, with a comment on what each command needs. "
                    "Zero-shot runs on it at once. An existing prompts.json is never overwritten.")
    starter.add_argument("folder", help="your dataset folder, with one sub-folder per class")
    starter.add_argument("--template", default=DEFAULT_TEMPLATE,
                         help="the prompt, {} for the class name, e.g. 'a MR photo of a {} in the brain.'")

    import_ = commands.add_parser(
        "import", help="read released attribute files ({class: [sentences]})",
        description="Read released attribute files, {class: [sentences]} (BioMedVR's *_des.json, *_dist.json, "
                    "*_confuse.json, BiomedCoOp's descriptions), into the class text. Keys match class names "
                    "with underscores or spaces, in any case; every key that matches no class is named.")
    import_.add_argument("dataset", **target)
    for field in TEXT_FIELDS:
        import_.add_argument(f"--{field}", metavar="FILE", help=f"the released {field}")
    import_.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                         help="read the key OLD as the class NEW (repeatable)")
    import_.add_argument("--out", metavar="FILE", help="write FILE (default: FOLDER/prompts.json)")
    import_.add_argument("--template", help="for a new file: the prompt, {} for the class name")
    import_.add_argument("--overwrite", action="store_true", help="replace the lists of the fields given")

    check_ = commands.add_parser(
        "check", help="say what each command can run on",
        description="Print per class and field the number of sentences, what each command needs, what the text "
                    "tower would cut (with --backbone), and every problem at once.")
    check_.add_argument("dataset", **target)
    check_.add_argument("--class-text", metavar="FILE", help="check FILE instead of the dataset's own text")
    check_.add_argument("--backbone", metavar="NAME", help="also tokenise every sentence as this backbone does "
                        "(biomedclip, clip, tiny, ...)")

    return parser


def cli(argv=None) -> int:
    """python classtext.py write|starter|import|check ...; returns the exit status."""
    args = build_parser().parse_args(argv)
    run = {"write": write, "import": import_text, "check": check,
           "starter": lambda a: print(f"wrote {write_prompts_starter(a.folder, a.template)}: the zero-shot baseline "
                                      "runs on it now; for BiomedAP write at least one sentence of descriptions per "
                                      "class, for BioMedVR one of each list (or python classtext.py write)")}
    try:
        return run[args.command](args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
