"""Summaries of finished runs: tables (markdown and CSV) and the sweep pictures.

    python report.py runs/          # writes runs/summary.md, summary.csv, fewshot.png, base2novel.png
    python report.py --published    # the papers' published tables, their sources, what differs

Tables per folder and method: zero-shot (three scorings, with the published BiomedCLIP means),
few-shot accuracy (datasets x shots, zero-shot at K=0, mean +- std over seeds, the average over
datasets), base-to-novel (base, novel, true harmonic mean and the arithmetic mean, with and
without BUSI), prompt robustness. Runs are found at any depth below the folder and grouped by the
folder above <method>. The natural-image benchmarks (data.NATURAL, BioMedVR's Table 3) get their
own few-shot table and their own averages, apart from the medical ones and your own datasets.
Runs of a method's ablation switches (`run.sh ablations`: run folders <method>-<switches>) are
also gathered into one ablation table per folder, method and K: rows the settings, columns the
datasets and their average. Where a summary's runs follow a published protocol (same backbone,
shots and method settings: `PROTOCOLS`), the published figure and our difference are printed
beside ours; `python report.py --published` prints the published tables, their sources and what
differs from our protocol.
Runs of one method made with different settings (epochs, learning rate, ..., anything in a run's
recorded identity but the seed) are never averaged together: each group is summarised apart,
labelled with its settings. Nothing imports this file; it reads only metrics.json files
(and the methods' defaults).
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

import biomedap
import biomedvr
import data
from common import ALIASES, UserError, harmonic_mean
from runner import OneLineParser, RunArgs, atomic_write_png, atomic_write_text, new_figure, setting_text

# BiomedCLIP's published zero-shot means ("a photo of a {}." on every dataset). The per-dataset
# rows could not be retrieved on the machines this was written on (the papers' tables are
# images; see the README), the averages could, with the datasets they average over:
PUBLISHED_FEWSHOT_MEAN = {"accuracy": 42.38, "without": "dermamnist",
                          "source": "CLIP-SVD README, BiomedCLIP zero-shot, 10 datasets without DermaMNIST"}
PUBLISHED_BASE2NOVEL_MEAN = {"base": 47.84, "novel": 65.42, "hm": 53.81, "without": "busi",
                             "source": "BiomedCoOp README, BiomedCLIP zero-shot, 10 datasets without BUSI; "
                                       "HM = mean of per-dataset HMs"}
NATURAL_TITLE = "the natural-image benchmarks (BioMedVR's Table 3)"
AVERAGES = {"average": False, "natural average": True}  # panel or row -> over the natural benchmarks?
SCORINGS = ("photo_template", "clinical_template", "descriptions")
ZERO_SHOT_COLUMN = "photo_template"  # K=0 of the few-shot tables and fewshot.png: as published


# --------------------------------------------------------------------------- published numbers
# What the papers publish and could be read (tables as printed; see --published for the sources).
TABLE1_COLUMNS = {"busi": "BUSI", "kneexray": "Knee", "kvasir": "Kvasir", "lungcolon": "LungColon",
                  "octmnist": "OCTMNIST", "btmri": "BTMRI", "chmnist": "CHMNIST", "covid": "COVID-19",
                  "ctkidney": "CT-Kidney", "dermamnist": "DermaMNIST", "retina": "Retina"}
PUBLISHED = {
    "biomedvr-table1": {
        "title": "BioMedVR Table 1: 16-shot top-1 accuracy (%), CLIP ViT-B/16",
        "source": "BioMedVR project page (jxliu-ai.github.io/biomedvr-page), Table 1; BUSI, Knee and Kvasir "
                  "also in the repository README (82.60, 45.74, 80.22, seed 1)",
        "differs": "published: one seed (1), the best test accuracy over 400 epochs (selected on the test set), "
                   "the authors' own splits (split_liu_*, not released); ours: BiomedCoOp's published splits, the "
                   "mean of seeds 1-3, the last epoch's accuracy (--eval-every N records the test-selected best "
                   "too); the AttrVR row's training budget is not stated (its released scripts run 200 epochs)",
        "columns": list(TABLE1_COLUMNS), "average": True, "decimals": 1,
        "rows": {"CoOp": (62.3, 27.5, 74.6, 80.6, 67.6, 79.2, 76.7, 73.0, 81.6, 43.6, 27.4, 63.6),
                 "CoCoOp": (64.4, 30.6, 77.2, 89.4, 69.2, 80.4, 71.5, 76.2, 78.6, 44.6, 52.5, 66.6),
                 "BiomedCoOp": (69.4, 30.6, 77.7, 91.5, 72.6, 81.6, 76.9, 77.4, 80.2, 50.9, 59.9, 71.5),
                 "VP": (70.9, 41.2, 75.2, 90.8, 65.3, 61.8, 70.8, 67.3, 67.6, 64.6, 74.8, 68.2),
                 "AR": (75.4, 39.6, 79.2, 94.3, 72.5, 73.5, 83.9, 76.3, 72.5, 59.6, 73.5, 72.6),
                 "AttrVR": (76.0, 33.6, 79.5, 93.8, 80.4, 76.2, 85.4, 71.0, 71.6, 62.1, 71.5, 72.8),
                 "BioMedVR": (82.6, 45.7, 80.2, 94.7, 80.3, 81.7, 84.5, 77.4, 74.0, 65.3, 74.1, 76.4)}},
    "biomedap-fewshot": {
        "title": "BiomedAP few-shot: average top-1 accuracy (%) over the 11 datasets, BiomedCLIP",
        "source": "BiomedAP repository README (github.com/tongdiedie/BiomedAP); the baseline rows are "
                  "Biomed-DPT's published numbers",
        "differs": "the published numbers come from the released code (our --variant official; --variant "
                   "paper is the method as the paper describes it); otherwise the protocol is ours too (3 seeds, "
                   "the last epoch, BiomedCoOp's splits) but for the random draws of training (deviation 13 of "
                   "biomedap.py); no per-dataset number is published, so only the average over all 11 compares",
        "columns": ["K=1", "K=2", "K=4", "K=8", "K=16"], "average": False, "decimals": 2,
        "rows": {"BiomedCoOp": (56.69, 58.58, 64.45, 68.84, 72.13), "Biomed-DPT": (59.03, 61.27, 66.12, 70.76, 73.51),
                 "BiomedAP": (63.57, 64.89, 67.92, 71.21, 75.09)}},
    "biomedap-base2novel": {
        "title": "BiomedAP base-to-novel: average accuracy (%) over the 11 datasets, 16 shots, BiomedCLIP",
        "source": "BiomedAP repository README (github.com/tongdiedie/BiomedAP)",
        "differs": "published \"HM\" is the arithmetic mean of the two averages (the harmonic mean of 81.62 and "
                   "78.42 is 79.99); the average includes BUSI, whose one novel class scores 100%; the released "
                   "base-to-novel drivers put the class token in the middle (ours: at the end)",
        "columns": ["base", "novel", "\"HM\" (arithmetic)"], "average": False, "decimals": 2,
        "rows": {"BiomedCoOp": (76.16, 73.09, 74.62), "Biomed-DPT": (78.06, 75.97, 77.02),
                 "BiomedAP": (81.62, 78.42, 80.02)}},
}
CLIP = ("clip", ALIASES["clip"])
BIOMEDCLIP = ("biomedclip", ALIASES["biomedclip"])
# A summary cell follows a published protocol when every run in it has this backbone, shots and
# protocol, these settings, and every other setting of its method at the default (`free`: any).
PROTOCOLS = (
    {"table": "biomedvr-table1", "row": "BioMedVR", "method": biomedvr, "backbone": CLIP, "shots": (16,),
     "protocol": "fewshot", "settings": {"cs_anchor": "fused"}, "free": ()},
    {"table": "biomedvr-table1", "row": "AttrVR", "method": biomedvr, "backbone": CLIP, "shots": (16,),
     "protocol": "fewshot", "settings": {"experts": "positive", "beta": 0}, "free": ("cs_anchor", "epochs")},
    {"table": "biomedap-fewshot", "row": "BiomedAP", "method": biomedap, "backbone": BIOMEDCLIP,
     "shots": (1, 2, 4, 8, 16), "protocol": "fewshot", "settings": {}, "free": ("variant",)},
    {"table": "biomedap-base2novel", "row": "BiomedAP", "method": biomedap, "backbone": BIOMEDCLIP,
     "shots": (16,), "protocol": "base2novel", "settings": {}, "free": ("variant",)},
)


def published_text() -> str:
    """The published tables (`PUBLISHED`), each with its source and what differs from our protocol."""
    lines = []
    for table in PUBLISHED.values():
        names = [TABLE1_COLUMNS.get(c, c) for c in table["columns"]] + (["average"] if table["average"] else [])
        lines += [f"## {table['title']}", "", "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {row} | " + " | ".join(f"{v:.{table['decimals']}f}" for v in values) + " |"
                  for row, values in table["rows"].items()]
        lines += ["", f"Source: {table['source']}.", f"What differs from ours: {table['differs']}.", ""]
    return "\n".join(lines)


def _follows(spec, key, seeds) -> bool:
    """Whether every run of a summary cell (`key` = folder, method, dataset, shots, protocol) follows
    the published protocol `spec`. Runs without recorded arguments never do."""
    _, method, dataset, shots, protocol = key
    if protocol != spec["protocol"] or shots not in spec["shots"] or not method.startswith(spec["method"].NAME):
        return False
    fields = [f for f in dataclasses.fields(spec["method"].Args) if not f.metadata.get("resume_may_differ")]
    wanted = {f.name: spec["settings"].get(f.name, f.default if f.default is not dataclasses.MISSING
                                           else f.default_factory()) for f in fields if f.name not in spec["free"]}
    return all(r.get("_args") and r["_args"].get("backbone") in spec["backbone"]
               and all(r["_args"].get(name, default) == default for name, default in wanted.items())
               for r in seeds.values())


def _published_beside(folder, method, cells, rows) -> list:
    """Lines with the published figure and our difference for the cells {key: {seed: metrics}} of
    one (folder, method) that follow a published protocol."""
    lines = []
    for spec in PROTOCOLS:
        table = PUBLISHED[spec["table"]]
        published = dict(zip(table["columns"], table["rows"][spec["row"]]))
        mine = {k: v for k, v in cells.items() if _follows(spec, k, v)}
        if not mine:
            continue
        head = f"{table['title']}, {spec['row']} row ({table['source'].split(';')[0]})"
        if spec["table"] == "biomedvr-table1":
            lines += [f"**Published beside ours**: {head}. {table['differs'][0].upper()}{table['differs'][1:]}.", "",
                      "| dataset | ours, last epoch | ours, best epoch (test-selected) | published | last − published "
                      "| best − published |", "|---|---|---|---|---|---|"]
            ours, best_of = {}, {}
            for (_, _, d, k, _), seeds in sorted(mine.items(), key=lambda kv: list(TABLE1_COLUMNS).index(kv[0][2])
                                                  if kv[0][2] in TABLE1_COLUMNS else 99):
                if d not in published:
                    continue
                m, s = _mean_std([r["test"]["accuracy"] for r in seeds.values()])
                best = [r.get("best_test_accuracy_test_selected", {}).get("accuracy") for r in seeds.values()]
                ours[d] = m
                if all(b is not None for b in best):
                    best_of[d] = float(np.mean(best))
                best_cells = (f"{best_of[d]:.2f}", f"{best_of[d] - published[d]:+.2f}") if d in best_of else ("–", "–")
                lines.append(f"| {d} | {m:.2f} ± {s:.2f} ({len(seeds)}) | {best_cells[0]} | {published[d]:.1f} | "
                             f"{m - published[d]:+.2f} | {best_cells[1]} |")
                rows.append([folder, method, "published", d, k, f"{spec['row']}_published", f"{published[d]}", "", ""])
            if ours:
                pub, mean = np.mean([published[d] for d in ours]), np.mean(list(ours.values()))
                best = np.mean(list(best_of.values())) if len(best_of) == len(ours) else None
                printed = f" (printed {table['rows'][spec['row']][-1]:.1f})" if len(ours) == 11 else ""
                lines.append(f"| **average** ({len(ours)} of 11) | {mean:.2f} | "
                             f"{'–' if best is None else f'{best:.2f}'} | {pub:.2f}{printed} | {mean - pub:+.2f} | "
                             f"{'–' if best is None else f'{best - pub:+.2f}'} |")
            lines.append("")
        else:
            lines += [f"**Published beside ours**: {head}. {table['differs'][0].upper()}{table['differs'][1:]}.", ""]
            for k in sorted({key[3] for key in mine}):
                per = {key[2]: seeds for key, seeds in mine.items() if key[3] == k and key[2] in data.MEDICAL}
                lines.append(_published_average(spec, k, per, published))
            lines.append("")
    return lines


def _published_average(spec, shots, per_dataset, published) -> str:
    """One line: our average over the medical benchmarks of a protocol's cells, the published one,
    and the difference (only over all 11 datasets: no per-dataset number is published)."""
    n = len(per_dataset)
    mean = lambda block: float(np.mean([np.mean([r[block]["accuracy"] for r in seeds.values()])  # noqa: E731
                                        for seeds in per_dataset.values()]))
    if spec["protocol"] == "fewshot":
        ours, pub = mean("test"), published[f"K={shots}"]
        diff = f"ours − published {ours - pub:+.2f}" if n == 11 else "no difference: the published one averages 11"
        return f"- K={shots}: ours {ours:.2f} over {n} of 11 datasets; published {pub:.2f}; {diff}"
    base, novel = mean("base"), mean("novel")
    pub_base, pub_novel, pub_hm = published["base"], published["novel"], published["\"HM\" (arithmetic)"]
    text = (f"- K={shots}: ours base {base:.2f} novel {novel:.2f} \"HM\" (arithmetic) {(base + novel) / 2:.2f} "
            f"(harmonic {harmonic_mean(base, novel):.2f}) over {n} of 11 datasets; published base {pub_base:.2f} "
            f"novel {pub_novel:.2f} \"HM\" {pub_hm:.2f} (harmonic {harmonic_mean(pub_base, pub_novel):.2f})")
    if n < 11:
        return text + "; no difference: the published one averages 11"
    return text + (f"; ours − published: base {base - pub_base:+.2f} novel {novel - pub_novel:+.2f} "
                   f"\"HM\" {(base + novel) / 2 - pub_hm:+.2f}")


# --------------------------------------------------------------------------- ablation tables
ABLATION_BASES = ("biomedap-official", "biomedap", "biomedvr-fused", "biomedvr")  # longest first
ABLATION_ROWS = (  # a run-folder suffix of the methods' run_name -> its row, in the sweep's order
    (r"no-fusion", "w/o fusion (and L_align)"), (r"fusion(\d+(?:-\d+)*)", "fusion at blocks {}"),
    (r"no-high", "w/o L_high (high anchor)"), (r"no-low", "w/o L_low (low anchor)"), (r"no-kl", "w/o L_kl"),
    (r"no-align", "w/o L_align"), (r"no-confidence", "w/o confidence weight (alpha 0)"),
    (r"low-(\w+)", "low anchor: {}"),
    (r"no-cs", "w/o L_CS (beta 0)"), (r"shared-program", "one program for both experts"),
    (r"fixed-gate", "fixed gate (1/2, 1/2)"), (r"gate-lr(\d[\d.]*(?:e[+-]\d+)?)", "gate lr {}"),
    (r"positive-no-cs", "w/o negative expert and L_CS (AttrVR)"), (r"positive", "positive expert only"),
)


def ablation_row(method):
    """(base method, row label, sort key) of a run folder name, or None for another method's."""
    base = next((b for b in ABLATION_BASES if method == b or method.startswith(b + "-")), None)
    if base is None:
        return None
    rest, labels, order = method[len(base) + 1:], [], []
    while rest:
        for i, (pattern, label) in enumerate(ABLATION_ROWS):
            found = re.match(pattern + r"(?:-|$)", rest)
            if found:
                labels.append(label.format(*found.groups()))
                order.append(i)
                rest = rest[found.end():]
                break
        else:
            return base, method[len(base) + 1:], (len(ABLATION_ROWS),)  # not a switch of ours: as it is
    return base, ", ".join(labels) or f"{base} (full method)", tuple(order)


def _ablation_tables(folder, runs, rows) -> list:
    """Per method (with its variant) and K, when the folder holds any of its ablations: a row per
    setting, a column per dataset (mean over seeds) and their average; with the published rows of
    a protocol those runs follow."""
    groups = {}
    for key, seeds in runs.items():
        parsed = ablation_row(key[1]) if key[0] == folder and key[4] == "fewshot" else None
        if parsed:
            groups.setdefault((parsed[0], key[3]), {}).setdefault(parsed[1:], {})[key] = seeds
    lines = []
    for (base, k), by_row in sorted(groups.items()):
        if len(by_row) < 2:
            continue
        datasets = sorted({key[2] for cells in by_row.values() for key in cells},
                          key=lambda d: (list(TABLE1_COLUMNS).index(d) if d in TABLE1_COLUMNS else 99, d))
        lines += [f"## {_label(folder, base)}: ablations, K={k}, accuracy (%), mean over seeds", "",
                  "| setting | " + " | ".join(datasets) + " | average |", "|---|" + "---|" * (len(datasets) + 1)]
        followed = []
        for (label, _), cells in sorted(by_row.items(), key=lambda kv: kv[0][1]):
            means = {key[2]: float(np.mean([r["test"]["accuracy"] for r in seeds.values()]))
                     for key, seeds in cells.items()}
            average = f"{np.mean(list(means.values())):.2f}" + (f" ({len(means)})" if len(means) < len(datasets) else "")
            lines.append(f"| {label} | " + " | ".join(f"{means[d]:.2f}" if d in means else "–" for d in datasets)
                         + f" | {average} |")
            rows += [[folder, f"{base} ({label})", "ablation", d, k, "accuracy", f"{m:.4f}", "", ""]
                     for d, m in means.items()]
            followed += [spec for spec in PROTOCOLS if spec["table"] == "biomedvr-table1"
                         and any(_follows(spec, key, seeds) for key, seeds in cells.items())]
        for spec in followed:  # the published row of a protocol these runs follow, on the same columns
            published = dict(zip(TABLE1_COLUMNS, PUBLISHED[spec["table"]]["rows"][spec["row"]]))
            values = [published.get(d) for d in datasets]
            known = [v for v in values if v is not None]
            lines.append(f"| *{spec['row']}, published (Table 1)* | " + " | ".join(
                f"{v:.1f}" if v is not None else "–" for v in values) + f" | {np.mean(known):.2f} |")
        lines.append("")
    return lines


def _run_key(parts):
    """(folder, method, dataset, shots, protocol, seed) from the parts of a metrics.json path
    below the summarised folder, or None when it is not in a run folder:
        <folder>/<method>/<dataset>/<K>shot[_base2novel]/seed<S>/metrics.json
        <folder>/zeroshot/<dataset>/seed<S>/metrics.json            (shots 0)
        <folder>/zeroshot/<dataset>/0shot_base2novel/seed<S>/metrics.json
    <folder> is whatever lies above (empty, "smoke/tiny", ...)."""
    *dirs, seed_dir, _ = parts
    if not (seed_dir.startswith("seed") and seed_dir[4:].isdigit()):
        return None
    if len(dirs) >= 3:
        shots, found, protocol = dirs[-1].partition("shot")
        if found and shots.isdigit() and protocol in ("", "_base2novel"):
            return ("/".join(dirs[:-3]), dirs[-3], dirs[-2], int(shots),
                    "base2novel" if protocol else "fewshot", int(seed_dir[4:]))
    if len(dirs) >= 2 and dirs[-2] == "zeroshot":
        return "/".join(dirs[:-2]), "zeroshot", dirs[-1], 0, "zeroshot", int(seed_dir[4:])
    return None


def _collect(root: Path, notes: list | None = None):
    """{(folder, method, dataset, shots, protocol): {seed: metrics}} from every metrics.json at
    any depth below `root`. Runs are kept apart by the folder above <method>, so runs of the same
    method and dataset made in two places (two backbones, say) never share a cell, and by their
    settings (`_apart_by_settings`, whose lines are added to `notes`)."""
    runs, identities = {}, {}
    for path in sorted(Path(root).rglob("metrics.json")):
        key = _run_key(path.relative_to(root).parts)
        if key is None:
            print(f"skipping {path}: not in a <method>/<dataset>/<K>shot/seed<S>/ folder", file=sys.stderr)
            continue
        try:
            record = json.loads(path.read_text())
            metrics = record["metrics"]
            if key[1] == "zeroshot" and "test" in metrics:  # written before the scorings had names
                metrics = {"clinical_template": metrics.pop("test"), **metrics}
            blocks = ("test",) if key[4] != "base2novel" else ("base", "novel")
            if key[1] == "zeroshot":
                blocks = ("clinical_template",) if key[4] != "base2novel" else (
                    "clinical_template_base", "clinical_template_novel")
            assert all(isinstance(metrics[b]["accuracy"], (int, float)) for b in blocks)
        except (ValueError, KeyError, TypeError, IndexError, AssertionError):
            print(f"skipping {path}: not a readable metrics.json", file=sys.stderr)
            continue
        metrics["_args"] = record.get("args")  # the run's settings: which published protocol it follows
        runs.setdefault(key[:5], {})[key[5]] = metrics
        identities.setdefault(key[:5], {})[key[5]] = _identity(record)
    runs, said = _apart_by_settings(runs, identities)
    (notes if notes is not None else []).extend(said)
    return runs


# What a run folder's path already tells apart: a cell of the tables is one of each.
CELL_SETTINGS = ("seed", "shots", "subsample", "dataset")
# The run flags that change no number: left out of an identity rebuilt from a run's arguments.
RUN_FLAGS = {f.name for f in dataclasses.fields(RunArgs) if f.metadata.get("resume_may_differ")}


def _identity(record) -> dict:
    """The settings a run's numbers depend on (runner.run_identity), as its metrics.json records
    them; for a run written before that record, its arguments less the run flags that change no
    number (a method's own such flags are then compared too: runs may be kept apart needlessly,
    never averaged wrongly)."""
    if isinstance(record.get("identity"), dict):
        return record["identity"]
    args = record.get("args") if isinstance(record.get("args"), dict) else {}
    return {k: v for k, v in args.items() if k not in RUN_FLAGS}


def _apart_by_settings(runs, identities):
    """(runs, notes): runs of one folder and method that differ in a setting the path does not tell
    (epochs, learning rate, loss weights, precision, ...; or, within one cell, two dataset folders
    of one name) are grouped by those settings, seed aside; each group becomes a method of its own,
    labelled with them ("biomedap (--epochs 5)"), so no table row, average or picture mixes them.
    A setting some records lack (they were written before it existed) is compared among the
    records that have it. `notes`: one line per folder and method split so."""
    def values(name, records):
        return {json.dumps(i[name], sort_keys=True) for i in records if name in i}
    out, notes = {}, []
    for folder, method in sorted({k[:2] for k in runs}):
        keys = [k for k in runs if k[:2] == (folder, method)]
        seen = [identity for k in keys for identity in identities[k].values()]
        names = sorted({name for identity in seen for name in identity} - set(CELL_SETTINGS))
        varying = [n for n in names if len(values(n, seen)) > 1]
        if any(len(values("dataset", identities[k].values())) > 1 for k in keys):
            varying.append("dataset")  # two folders of one name in one cell
        if method == "zeroshot" or not varying:
            out.update({k: runs[k] for k in keys})
            continue
        for k in keys:
            for seed, metrics in runs[k].items():
                identity = identities[k][seed]
                label = f"{method} (" + ", ".join(f"--{n.replace('_', '-')} {setting_text(identity.get(n))}"
                                                   for n in varying) + ")"
                out.setdefault((folder, label, *k[2:]), {})[seed] = metrics
        notes.append(f"{_label(folder, method)}: runs made with different settings ("
                     + ", ".join(f"--{n.replace('_', '-')}" for n in varying) + ") are summarised apart")
    return out, notes


def _label(folder, method):
    return f"{folder}/{method}" if folder else method


def _mean_std(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def _mean_cell(values) -> str:
    """"mean ± std (seeds)" over several seeds; one seed has no spread to show: "mean (1 seed)"."""
    m, s = _mean_std(values)
    return f"{m:.2f} ± {s:.2f} ({len(values)})" if len(values) > 1 else f"{m:.2f} (1 seed)"


def _test_size(runs, blocks) -> str:
    """The test images n behind a cell: the "n" of the metrics `blocks` (one block name, or one
    per part, e.g. base and novel, shown as "base/novel") over all `runs`; a range when they
    differ, "–" when the runs do not record it."""
    parts = []
    for block in [blocks] if isinstance(blocks, str) else blocks:
        sizes = {r[block].get("n") for r in runs if isinstance(r.get(block), dict)} - {None}
        parts.append("–" if not sizes else str(min(sizes)) if len(sizes) == 1 else f"{min(sizes)}-{max(sizes)}")
    return "/".join(parts)


def summarize(root="runs") -> str:
    """Tables per folder and method: zero-shot (template and description scoring), few-shot
    accuracy (datasets x shots with the zero-shot column at K=0, mean +- std over seeds and the
    average over datasets), base-to-novel (base, novel, true harmonic mean, and the arithmetic
    mean labelled as such, with and without BUSI), prompt robustness. Runs are found at any
    depth and grouped by the folder above <method> (shown in each heading).
    Writes summary.md, summary.csv, fewshot.png and (with base-to-novel runs) base2novel.png
    into `root` and returns the markdown."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: pass the folder that holds the run folders (default: runs)")
    notes = []
    runs = _collect(root, notes)
    folders = sorted({k[0] for k in runs})
    counts = {f: sum(len(v) for k, v in runs.items() if k[0] == f) for f in folders}
    lines = [f"Read {sum(counts.values())} runs under {root}: "
             + ", ".join(f"{f or '.'} ({n})" for f, n in counts.items()), ""]
    lines += [line for note in notes for line in (note, "")]
    rows = [["folder", "method", "protocol", "dataset", "shots", "metric", "mean", "std", "seeds", "n"]]
    for folder in folders:
        zero = {k[2]: v for k, v in runs.items() if k[0] == folder and k[3:] == (0, "zeroshot")}
        lines += _zero_shot_table(folder, zero, rows)
        zero_b2n = {k[2]: v for k, v in runs.items() if k[:2] == (folder, "zeroshot") and k[4] == "base2novel"}
        lines += _zero_shot_base2novel_table(folder, zero_b2n, rows)
        for method in sorted({k[1] for k in runs if k[0] == folder} - {"zeroshot"}):
            label = _label(folder, method)
            few = {k: v for k, v in runs.items() if k[:2] == (folder, method) and k[4] == "fewshot"}
            for natural in (False, True):  # the natural benchmarks apart, as the paper's Table 3
                part = {k: v for k, v in few.items() if (k[2] in data.NATURAL) == natural}
                if part:
                    lines += _fewshot_table(folder, method, part, zero, rows, natural)
                    lines += _published_beside(folder, method, part, rows) if not natural else []
            if few:
                lines += _robustness_table(folder, method, few, rows)
            b2n = {k: v for k, v in runs.items() if k[:2] == (folder, method) and k[4] == "base2novel"}
            if b2n:
                lines += [f"## {label}: base-to-novel accuracy (%), mean over seeds (n: test images)", "",
                          "| dataset | shots | n base/novel | base | novel | HM (harmonic) | arithmetic mean |",
                          "|---|---|---|---|---|---|---|"]
                table = {}
                for (_, _, d, k, _), seeds in sorted(b2n.items()):
                    base = np.mean([r["base"]["accuracy"] for r in seeds.values()])
                    novel = np.mean([r["novel"]["accuracy"] for r in seeds.values()])
                    table[d] = (base, novel)
                    n = _test_size(seeds.values(), ("base", "novel"))
                    lines.append(f"| {d} | {k} | {n} | {base:.2f} | {novel:.2f} | {harmonic_mean(base, novel):.2f} | "
                                 f"{(base + novel) / 2:.2f} |")
                    rows += [[folder, method, "base2novel", d, k, "base", f"{base:.4f}", "", len(seeds),
                              _test_size(seeds.values(), "base")],
                             [folder, method, "base2novel", d, k, "novel", f"{novel:.4f}", "", len(seeds),
                              _test_size(seeds.values(), "novel")]]
                for name, keep in (("average", lambda d: d not in data.NATURAL),
                                   ("average without BUSI", lambda d: d not in data.NATURAL and d != "busi"),
                                   ("natural average", lambda d: d in data.NATURAL)):
                    vals = [v for d, v in table.items() if keep(d)]
                    if vals:
                        base, novel = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
                        mean_hm = np.mean([harmonic_mean(*v) for v in vals])
                        lines.append(f"| **{name}** ({len(vals)}) | | | {base:.2f} | {novel:.2f} | "
                                     f"{harmonic_mean(base, novel):.2f} (mean of per-dataset HM {mean_hm:.2f}) | "
                                     f"{(base + novel) / 2:.2f} |")
                lines.append("")
                lines += _published_beside(folder, method, b2n, rows)
        lines += _ablation_tables(folder, runs, rows)
    text = "\n".join(lines) if runs else f"no finished runs under {root}"
    atomic_write_text(root / "summary.md", text + "\n")
    table = io.StringIO(newline="")
    csv.writer(table).writerows(rows)
    atomic_write_text(root / "summary.csv", table.getvalue())  # a full disk: one line, no .tmp left
    series = fewshot_series(runs)
    if series:
        plot_fewshot(series, root / "fewshot.png")
    bars = base2novel_series(runs)
    if bars:
        plot_base2novel(bars, root / "base2novel.png")
    return text


def _zero_shot_table(folder, zero, rows):
    """Datasets x scorings, our mean over the published datasets, and the published mean."""
    if not zero:
        return []
    lines = [f"## {_label(folder, 'zeroshot')}: zero-shot accuracy (%) of the frozen backbone (n: test images)", "",
             "| dataset | n | " + " | ".join(SCORINGS) + " |", "|---|---|" + "---|" * len(SCORINGS)]
    photo = {}
    for d, seeds in sorted(zero.items()):
        n = _test_size(seeds.values(), ZERO_SHOT_COLUMN)
        cells = [n]
        for scoring in SCORINGS:
            values = [r[scoring]["accuracy"] for r in seeds.values() if scoring in r]
            if not values:
                cells.append("–")
                continue
            m, s = _mean_std(values)
            cells.append(f"{m:.2f}")
            rows.append([folder, "zeroshot", "zeroshot", d, 0, f"{scoring}_accuracy", f"{m:.4f}", f"{s:.4f}",
                         len(values), n])
            if scoring == "photo_template":
                photo[d] = m
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    published = PUBLISHED_FEWSHOT_MEAN
    compared = [d for d in data.MEDICAL if d != published["without"]]
    ours = [photo[d] for d in compared if d in photo]
    if ours:
        lines += ["", f"photo_template, mean over the {len(compared)} benchmark datasets without "
                  f"{published['without']}: ours {np.mean(ours):.2f} ({len(ours)} of {len(compared)} datasets "
                  f"measured); published {published['accuracy']:.2f} ({published['source']})"]
    return lines + [""]


def _zero_shot_base2novel_table(folder, zero, rows):
    """Base, novel and HM per scoring, the mean over the published datasets, the published mean."""
    if not zero:
        return []
    lines = [f"## {_label(folder, 'zeroshot')}: base-to-novel zero-shot accuracy (%) (n: test images)", "",
             "| dataset | scoring | n base/novel | base | novel | HM |", "|---|---|---|---|---|---|"]
    photo = {}
    for d, seeds in sorted(zero.items()):
        for scoring in SCORINGS:
            if not all(f"{scoring}_base" in r for r in seeds.values()):
                continue
            base = float(np.mean([r[f"{scoring}_base"]["accuracy"] for r in seeds.values()]))
            novel = float(np.mean([r[f"{scoring}_novel"]["accuracy"] for r in seeds.values()]))
            n = _test_size(seeds.values(), (f"{scoring}_base", f"{scoring}_novel"))
            lines.append(f"| {d} | {scoring} | {n} | {base:.2f} | {novel:.2f} | {harmonic_mean(base, novel):.2f} |")
            rows += [[folder, "zeroshot", "base2novel", d, 0, f"{scoring}_base", f"{base:.4f}", "", len(seeds),
                      _test_size(seeds.values(), f"{scoring}_base")],
                     [folder, "zeroshot", "base2novel", d, 0, f"{scoring}_novel", f"{novel:.4f}", "", len(seeds),
                      _test_size(seeds.values(), f"{scoring}_novel")]]
            if scoring == "photo_template":
                photo[d] = (base, novel)
    published = PUBLISHED_BASE2NOVEL_MEAN
    compared = [d for d in data.MEDICAL if d != published["without"]]
    ours = [photo[d] for d in compared if d in photo]
    if ours:
        base, novel = np.mean([b for b, _ in ours]), np.mean([n for _, n in ours])
        hm = np.mean([harmonic_mean(b, n) for b, n in ours])
        lines += ["", f"photo_template, mean over the {len(compared)} benchmark datasets without "
                  f"{published['without']}: ours base {base:.2f} novel {novel:.2f} HM {hm:.2f} "
                  f"({len(ours)} of {len(compared)} datasets measured); published base {published['base']:.2f} "
                  f"novel {published['novel']:.2f} HM {published['hm']:.2f} ({published['source']})"]
    return lines + [""]


def _fewshot_table(folder, method, few, zero, rows, natural=False):
    """Datasets x shots; the first column is the zero-shot run of the same folder ("a photo of a
    {}.", the published zero-shot rows' template). `natural`: `few` holds the natural-image
    benchmarks, whose table is headed as such."""
    shots = sorted({k[3] for k in few})
    datasets = sorted({k[2] for k in few})
    on = f" on {NATURAL_TITLE}" if natural else ""
    lines = [f"## {_label(folder, method)}: few-shot accuracy (%){on}, mean ± std over seeds (their number; K=0: "
             "zero-shot; n: test images)", "",
             "| dataset | n | K=0 | " + " | ".join(f"K={k}" for k in shots) + " |", "|---|---|---|" + "---|" * len(shots)]
    per_shot = {k: [] for k in [0, *shots]}
    for d in datasets:
        n = _test_size([r for (_, _, d_, _, _), seeds in few.items() if d_ == d for r in seeds.values()], "test")
        cells = [n]
        for k in [0, *shots]:
            seeds = zero.get(d, {}) if k == 0 else few.get((folder, method, d, k, "fewshot"), {})
            if not seeds:
                cells.append("–")
                continue
            values = [r[ZERO_SHOT_COLUMN if k == 0 else "test"]["accuracy"] for r in seeds.values()]
            m, s = _mean_std(values)
            per_shot[k].append(m)
            cells.append(f"{m:.2f}" if k == 0 else _mean_cell(values))
            if k:
                rows.append([folder, method, "fewshot", d, k, "accuracy", f"{m:.4f}", f"{s:.4f}", len(seeds),
                             _test_size(seeds.values(), "test")])
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | " + " | ".join(
        f"{np.mean(v):.2f} ({len(v)} dataset{'s' if len(v) > 1 else ''})" if v else "–" for v in per_shot.values()) + " |")
    return lines + [""]


def _robustness_table(folder, method, few, rows):
    robust = {k: v for k, v in few.items() if all("robustness" in r for r in v.values())}
    if not robust:
        return []
    names = list(next(iter(next(iter(robust.values())).values()))["robustness"]["accuracy"])
    lines = [f"## {_label(folder, method)}: accuracy (%) under prompt perturbations, mean over seeds", "",
             "| dataset | shots | " + " | ".join(names) + " | mean drop |", "|---|---|" + "---|" * (len(names) + 1)]
    for (_, _, d, k, _), seeds in sorted(robust.items()):
        acc = [np.mean([r["robustness"]["accuracy"][n] for r in seeds.values()]) for n in names]
        drop = np.mean([r["robustness"]["mean_drop"] for r in seeds.values()])
        lines.append(f"| {d} | {k} | " + " | ".join(f"{a:.2f}" for a in acc) + f" | {drop:.2f} |")
        rows.append([folder, method, "robustness", d, k, "mean_drop", f"{drop:.4f}", "", len(seeds),
                     _test_size(seeds.values(), "test")])
    return lines + [""]


def fewshot_series(runs) -> dict:
    """What fewshot.png plots: {panel: {label: [(shots, mean, low, high), ...]}}. A panel is a
    dataset, or "average" when there are several ("natural average" for the natural-image
    benchmarks, averaged apart); a label is "<folder>/<method>", or "<folder>/zero-shot" with one
    point at K=0 ("a photo of a {}." scoring); low and high are the min and max over seeds. An
    average panel averages its datasets that have each K; its spread is over the per-seed averages
    when those datasets share their seeds, else none."""
    accuracy = {}  # label -> dataset -> shots -> {seed: accuracy}
    for (folder, method, d, k, protocol), seeds in runs.items():
        if protocol != "base2novel" and (protocol != "zeroshot" or all(ZERO_SHOT_COLUMN in r for r in seeds.values())):
            label = _label(folder, "zero-shot" if protocol == "zeroshot" else method)
            block = ZERO_SHOT_COLUMN if protocol == "zeroshot" else "test"
            accuracy.setdefault(label, {}).setdefault(d, {})[k] = {s: r[block]["accuracy"] for s, r in seeds.items()}
    datasets = {d for by_dataset in accuracy.values() for d in by_dataset}
    groups = {panel: {d for d in datasets if (d in data.NATURAL) == natural} for panel, natural in AVERAGES.items()}
    series = {}
    for label, by_dataset in sorted(accuracy.items()):
        for d, by_shots in by_dataset.items():
            series.setdefault(d, {})[label] = [(k, float(np.mean(list(a.values()))), min(a.values()), max(a.values()))
                                               for k, a in sorted(by_shots.items())]
        for panel, members in groups.items():
            group = [by_shots for d, by_shots in by_dataset.items() if d in members]
            if len(members) < 2 or not group:
                continue
            points = []
            for k in sorted({k for by_shots in group for k in by_shots}):
                per_dataset = [by_shots[k] for by_shots in group if k in by_shots]
                mean = float(np.mean([np.mean(list(a.values())) for a in per_dataset]))
                seeds = [set(a) for a in per_dataset]
                if all(s == seeds[0] for s in seeds):
                    per_seed = [np.mean([a[s] for a in per_dataset]) for s in seeds[0]]
                    points.append((k, mean, float(min(per_seed)), float(max(per_seed))))
                else:
                    points.append((k, mean, mean, mean))
            series.setdefault(panel, {})[label] = points
    return series


def plot_fewshot(series: dict, path: Path):
    """One panel per dataset (and the averages): accuracy against K, a line per method with
    min-max error bars over seeds, the zero-shot runs as stars at K=0."""
    panels = sorted(p for p in series if p not in AVERAGES) + [p for p in AVERAGES if p in series]
    shots = sorted({pt[0] for by_label in series.values() for pts in by_label.values() for pt in pts})
    labels = sorted({label for by_label in series.values() for label in by_label})
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    marker = {label: "os^Dvp<>hX"[i % 10] for i, label in enumerate(labels)}
    # a small horizontal offset per series: methods with equal accuracy stay visible side by side
    step = min(0.06, 0.3 / max(len(labels) - 1, 1))  # all of them within 0.3 of a tick
    offset = {label: step * (i - (len(labels) - 1) / 2) for i, label in enumerate(labels)}
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    legend_cols = min(len(labels), max(ncols, 2))  # about one "<folder>/<method>" per 3 inches
    fig = new_figure(max(3.0 * ncols, 4.5), 2.5 * nrows + 0.2 * math.ceil(len(labels) / legend_cols) + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for label, points in series[panel].items():
            k, mean, low, high = (np.array(v) for v in zip(*points))
            zero = label.split("/")[-1] == "zero-shot"
            ax.errorbar([shots.index(s) + offset[label] for s in k], mean, yerr=[mean - low, high - mean],
                        color=colour[label], marker="*" if zero else marker[label], markersize=10 if zero else 5,
                        markerfacecolor="none" if not zero else colour[label], linestyle="none" if zero else "-",
                        capsize=2, label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xticks(range(len(shots)), [str(s) for s in shots], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("shots K (0: zero-shot)", fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=legend_cols, fontsize=7)
    atomic_write_png(fig, path)


def base2novel_series(runs) -> dict:
    """What base2novel.png plots: {"<folder>/<method>": [(name, base, novel, HM), ...]}, means
    over seeds per dataset (name "<dataset> K=<shots>") and, with several datasets, their
    average with the true harmonic mean of the averaged base and novel accuracy, as in the table
    ("natural average" for the natural-image benchmarks, averaged apart)."""
    bars, kinds = {}, {}  # kinds: label -> [is the dataset natural?], beside its entries
    for (folder, method, d, k, protocol), seeds in sorted(runs.items()):
        if protocol == "base2novel" and method != "zeroshot":
            base = float(np.mean([r["base"]["accuracy"] for r in seeds.values()]))
            novel = float(np.mean([r["novel"]["accuracy"] for r in seeds.values()]))
            bars.setdefault(_label(folder, method), []).append((f"{d} K={k}", base, novel, harmonic_mean(base, novel)))
            kinds.setdefault(_label(folder, method), []).append(d in data.NATURAL)
    for label, entries in bars.items():
        for name, natural in AVERAGES.items():
            group = [e for e, kind in zip(entries, kinds[label]) if kind == natural]
            if len(group) > 1:
                base, novel = float(np.mean([e[1] for e in group])), float(np.mean([e[2] for e in group]))
                entries.append((name, base, novel, harmonic_mean(base, novel)))
    return bars


def plot_base2novel(bars: dict, path: Path):
    """A panel per folder/method: base, novel and harmonic-mean bars for each dataset."""
    width = max(len(entries) for entries in bars.values())
    fig = new_figure(1.5 + 0.9 * width, 2.6 * len(bars) + 0.4)
    for ax, (label, entries) in zip(fig.subplots(len(bars), 1, squeeze=False)[:, 0], bars.items()):
        x = np.arange(len(entries))
        for i, name in enumerate(("base", "novel", "HM")):
            ax.bar(x + (i - 1) * 0.27, [e[i + 1] for e in entries], 0.27, label=name, color=f"C{i}")
        ax.set_xticks(x, [e[0] for e in entries], rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.set_title(f"{label}: base-to-novel", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    atomic_write_png(fig, path)


def main(argv=None):
    parser = OneLineParser(prog="python report.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR",
                        help="the folder holding the run folders, at any depth (default: runs)")
    parser.add_argument("--published", action="store_true",
                        help="print the papers' published tables, their sources and what differs from ours")
    args = parser.parse_args(argv)
    try:
        print(published_text() if args.published else summarize(args.runs_dir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
