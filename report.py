"""Summaries of finished runs: tables (markdown and CSV) and the sweep pictures.

    python report.py runs/          # writes runs/summary.md, summary.csv, fewshot.png, base2novel.png

Tables per folder and method: zero-shot (three scorings, with the published BiomedCLIP means),
few-shot accuracy (datasets x shots, zero-shot at K=0, mean +- std over seeds, the average over
datasets), base-to-novel (base, novel, true harmonic mean and the arithmetic mean, with and
without BUSI), prompt robustness. Runs are found at any depth below the folder and grouped by the
folder above <method>. The natural-image benchmarks (data.NATURAL, BioMedVR's Table 3) get their
own few-shot table and their own averages, apart from the medical ones and your own datasets.
Runs of one method made with different settings (epochs, learning rate, ..., anything in a run's
recorded identity but the seed) are never averaged together: each group is summarised apart,
labelled with its settings. Nothing imports this file; it reads only metrics.json files.
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

import data
from common import UserError, harmonic_mean
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
    rows = [["folder", "method", "protocol", "dataset", "shots", "metric", "mean", "std", "seeds"]]
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
            if few:
                lines += _robustness_table(folder, method, few, rows)
            b2n = {k: v for k, v in runs.items() if k[:2] == (folder, method) and k[4] == "base2novel"}
            if b2n:
                lines += [f"## {label}: base-to-novel accuracy (%), mean over seeds", "",
                          "| dataset | shots | base | novel | HM (harmonic) | arithmetic mean |",
                          "|---|---|---|---|---|---|"]
                table = {}
                for (_, _, d, k, _), seeds in sorted(b2n.items()):
                    base = np.mean([r["base"]["accuracy"] for r in seeds.values()])
                    novel = np.mean([r["novel"]["accuracy"] for r in seeds.values()])
                    table[d] = (base, novel)
                    lines.append(f"| {d} | {k} | {base:.2f} | {novel:.2f} | {harmonic_mean(base, novel):.2f} | "
                                 f"{(base + novel) / 2:.2f} |")
                    rows += [[folder, method, "base2novel", d, k, "base", f"{base:.4f}", "", len(seeds)],
                             [folder, method, "base2novel", d, k, "novel", f"{novel:.4f}", "", len(seeds)]]
                for name, keep in (("average", lambda d: d not in data.NATURAL),
                                   ("average without BUSI", lambda d: d not in data.NATURAL and d != "busi"),
                                   ("natural average", lambda d: d in data.NATURAL)):
                    vals = [v for d, v in table.items() if keep(d)]
                    if vals:
                        base, novel = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
                        mean_hm = np.mean([harmonic_mean(*v) for v in vals])
                        lines.append(f"| **{name}** ({len(vals)}) | | {base:.2f} | {novel:.2f} | "
                                     f"{harmonic_mean(base, novel):.2f} (mean of per-dataset HM {mean_hm:.2f}) | "
                                     f"{(base + novel) / 2:.2f} |")
                lines.append("")
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
    lines = [f"## {_label(folder, 'zeroshot')}: zero-shot accuracy (%) of the frozen backbone", "",
             "| dataset | " + " | ".join(SCORINGS) + " |", "|---|" + "---|" * len(SCORINGS)]
    photo = {}
    for d, seeds in sorted(zero.items()):
        cells = []
        for scoring in SCORINGS:
            values = [r[scoring]["accuracy"] for r in seeds.values() if scoring in r]
            if not values:
                cells.append("–")
                continue
            m, s = _mean_std(values)
            cells.append(f"{m:.2f}")
            rows.append([folder, "zeroshot", "zeroshot", d, 0, f"{scoring}_accuracy", f"{m:.4f}", f"{s:.4f}",
                         len(values)])
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
    lines = [f"## {_label(folder, 'zeroshot')}: base-to-novel zero-shot accuracy (%)", "",
             "| dataset | scoring | base | novel | HM |", "|---|---|---|---|---|"]
    photo = {}
    for d, seeds in sorted(zero.items()):
        for scoring in SCORINGS:
            if not all(f"{scoring}_base" in r for r in seeds.values()):
                continue
            base = float(np.mean([r[f"{scoring}_base"]["accuracy"] for r in seeds.values()]))
            novel = float(np.mean([r[f"{scoring}_novel"]["accuracy"] for r in seeds.values()]))
            lines.append(f"| {d} | {scoring} | {base:.2f} | {novel:.2f} | {harmonic_mean(base, novel):.2f} |")
            rows += [[folder, "zeroshot", "base2novel", d, 0, f"{scoring}_base", f"{base:.4f}", "", len(seeds)],
                     [folder, "zeroshot", "base2novel", d, 0, f"{scoring}_novel", f"{novel:.4f}", "", len(seeds)]]
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
    lines = [f"## {_label(folder, method)}: few-shot accuracy (%){on}, mean ± std over seeds (K=0: zero-shot)", "",
             "| dataset | K=0 | " + " | ".join(f"K={k}" for k in shots) + " |", "|---|---|" + "---|" * len(shots)]
    per_shot = {k: [] for k in [0, *shots]}
    for d in datasets:
        cells = []
        for k in [0, *shots]:
            seeds = zero.get(d, {}) if k == 0 else few.get((folder, method, d, k, "fewshot"), {})
            if not seeds:
                cells.append("–")
                continue
            m, s = _mean_std([r[ZERO_SHOT_COLUMN if k == 0 else "test"]["accuracy"] for r in seeds.values()])
            per_shot[k].append(m)
            cells.append(f"{m:.2f}" if k == 0 else f"{m:.2f} ± {s:.2f} ({len(seeds)})")
            if k:
                rows.append([folder, method, "fewshot", d, k, "accuracy", f"{m:.4f}", f"{s:.4f}", len(seeds)])
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(
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
        rows.append([folder, method, "robustness", d, k, "mean_drop", f"{drop:.4f}", "", len(seeds)])
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
    args = parser.parse_args(argv)
    try:
        print(summarize(args.runs_dir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
