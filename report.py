"""Summaries of finished runs: tables (markdown and CSV) and the sweep pictures.

    python report.py runs/          # writes runs/summary.md, summary.csv, fewshot.png, base2novel.png

Tables per folder and method: zero-shot (three scorings, with the published BiomedCLIP means),
few-shot accuracy (datasets x shots, zero-shot at K=0, mean +- std over seeds, the average over
datasets), base-to-novel (base, novel, true harmonic mean and the arithmetic mean, with and
without BUSI), prompt robustness. Runs are found at any depth below the folder and grouped by the
folder above <method>. Nothing imports this file; it reads only metrics.json files.
"""
import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from common import UserError, harmonic_mean
from runner import OneLineParser, atomic_write_png, atomic_write_text, new_figure

# BiomedCLIP's published zero-shot means ("a photo of a {}." on every dataset). The per-dataset
# rows could not be retrieved on the machines this was written on (the papers' tables are
# images; see the README), the averages could, with the datasets they average over:
PUBLISHED_FEWSHOT_MEAN = {"accuracy": 42.38, "without": "dermamnist",
                          "source": "CLIP-SVD README, BiomedCLIP zero-shot, 10 datasets without DermaMNIST"}
PUBLISHED_BASE2NOVEL_MEAN = {"base": 47.84, "novel": 65.42, "hm": 53.81, "without": "busi",
                             "source": "BiomedCoOp README, BiomedCLIP zero-shot, 10 datasets without BUSI; "
                                       "HM = mean of per-dataset HMs"}
BENCHMARKS = ("btmri", "busi", "chmnist", "covid", "ctkidney", "dermamnist", "kneexray", "kvasir", "lungcolon",
              "octmnist", "retina")
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


def _collect(root: Path):
    """{(folder, method, dataset, shots, protocol): {seed: metrics}} from every metrics.json at
    any depth below `root`. Runs are kept apart by the folder above <method>, so runs of the
    same method and dataset made in two places (two backbones, say) never share a cell."""
    runs = {}
    for path in sorted(Path(root).rglob("metrics.json")):
        key = _run_key(path.relative_to(root).parts)
        if key is None:
            print(f"skipping {path}: not in a <method>/<dataset>/<K>shot/seed<S>/ folder", file=sys.stderr)
            continue
        try:
            metrics = json.loads(path.read_text())["metrics"]
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
    return runs


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
    runs = _collect(root)
    folders = sorted({k[0] for k in runs})
    counts = {f: sum(len(v) for k, v in runs.items() if k[0] == f) for f in folders}
    lines = [f"Read {sum(counts.values())} runs under {root}: "
             + ", ".join(f"{f or '.'} ({n})" for f, n in counts.items()), ""]
    rows = [["folder", "method", "protocol", "dataset", "shots", "metric", "mean", "std", "seeds", "n"]]
    for folder in folders:
        zero = {k[2]: v for k, v in runs.items() if k[0] == folder and k[3:] == (0, "zeroshot")}
        lines += _zero_shot_table(folder, zero, rows)
        zero_b2n = {k[2]: v for k, v in runs.items() if k[:2] == (folder, "zeroshot") and k[4] == "base2novel"}
        lines += _zero_shot_base2novel_table(folder, zero_b2n, rows)
        for method in sorted({k[1] for k in runs if k[0] == folder} - {"zeroshot"}):
            label = _label(folder, method)
            few = {k: v for k, v in runs.items() if k[:2] == (folder, method) and k[4] == "fewshot"}
            if few:
                lines += _fewshot_table(folder, method, few, zero, rows)
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
                for name, keep in (("average", lambda d: True), ("average without BUSI", lambda d: d != "busi")):
                    vals = [v for d, v in table.items() if keep(d)]
                    if vals:
                        base, novel = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
                        mean_hm = np.mean([harmonic_mean(*v) for v in vals])
                        lines.append(f"| **{name}** ({len(vals)}) | | | {base:.2f} | {novel:.2f} | "
                                     f"{harmonic_mean(base, novel):.2f} (mean of per-dataset HM {mean_hm:.2f}) | "
                                     f"{(base + novel) / 2:.2f} |")
                lines.append("")
    text = "\n".join(lines) if runs else f"no finished runs under {root}"
    atomic_write_text(root / "summary.md", text + "\n")
    try:
        with open(root / "summary.csv.tmp", "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            csv.writer(f).writerows(rows)
        os.replace(root / "summary.csv.tmp", root / "summary.csv")
    finally:
        (root / "summary.csv.tmp").unlink(missing_ok=True)  # after a failure: no .tmp is left behind
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
    compared = [d for d in BENCHMARKS if d != published["without"]]
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
    compared = [d for d in BENCHMARKS if d != published["without"]]
    ours = [photo[d] for d in compared if d in photo]
    if ours:
        base, novel = np.mean([b for b, _ in ours]), np.mean([n for _, n in ours])
        hm = np.mean([harmonic_mean(b, n) for b, n in ours])
        lines += ["", f"photo_template, mean over the {len(compared)} benchmark datasets without "
                  f"{published['without']}: ours base {base:.2f} novel {novel:.2f} HM {hm:.2f} "
                  f"({len(ours)} of {len(compared)} datasets measured); published base {published['base']:.2f} "
                  f"novel {published['novel']:.2f} HM {published['hm']:.2f} ({published['source']})"]
    return lines + [""]


def _fewshot_table(folder, method, few, zero, rows):
    """Datasets x shots; the first column is the zero-shot run of the same folder ("a photo of a
    {}.", the published zero-shot rows' template)."""
    shots = sorted({k[3] for k in few})
    datasets = sorted({k[2] for k in few})
    lines = [f"## {_label(folder, method)}: few-shot accuracy (%), mean ± std over seeds (their number; K=0: "
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
    dataset, or "average" when there are several; a label is "<folder>/<method>", or
    "<folder>/zero-shot" with one point at K=0 ("a photo of a {}." scoring); low and high are the min
    and max over seeds. The average panel averages the datasets that have each K; its spread
    is over the per-seed averages when those datasets share their seeds, else none."""
    accuracy = {}  # label -> dataset -> shots -> {seed: accuracy}
    for (folder, method, d, k, protocol), seeds in runs.items():
        if protocol != "base2novel" and (protocol != "zeroshot" or all(ZERO_SHOT_COLUMN in r for r in seeds.values())):
            label = _label(folder, "zero-shot" if protocol == "zeroshot" else method)
            block = ZERO_SHOT_COLUMN if protocol == "zeroshot" else "test"
            accuracy.setdefault(label, {}).setdefault(d, {})[k] = {s: r[block]["accuracy"] for s, r in seeds.items()}
    several = len({d for by_dataset in accuracy.values() for d in by_dataset}) > 1
    series = {}
    for label, by_dataset in sorted(accuracy.items()):
        for d, by_shots in by_dataset.items():
            series.setdefault(d, {})[label] = [(k, float(np.mean(list(a.values()))), min(a.values()), max(a.values()))
                                               for k, a in sorted(by_shots.items())]
        if several:
            points = []
            for k in sorted({k for by_shots in by_dataset.values() for k in by_shots}):
                per_dataset = [by_shots[k] for by_shots in by_dataset.values() if k in by_shots]
                mean = float(np.mean([np.mean(list(a.values())) for a in per_dataset]))
                seeds = [set(a) for a in per_dataset]
                if all(s == seeds[0] for s in seeds):
                    per_seed = [np.mean([a[s] for a in per_dataset]) for s in seeds[0]]
                    points.append((k, mean, float(min(per_seed)), float(max(per_seed))))
                else:
                    points.append((k, mean, mean, mean))
            series.setdefault("average", {})[label] = points
    return series


def plot_fewshot(series: dict, path: Path):
    """One panel per dataset (and the average): accuracy against K, a line per method with
    min-max error bars over seeds, the zero-shot runs as stars at K=0."""
    panels = sorted(p for p in series if p != "average") + (["average"] if "average" in series else [])
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
    average with the true harmonic mean of the averaged base and novel accuracy, as in the table."""
    bars = {}
    for (folder, method, d, k, protocol), seeds in sorted(runs.items()):
        if protocol == "base2novel" and method != "zeroshot":
            base = float(np.mean([r["base"]["accuracy"] for r in seeds.values()]))
            novel = float(np.mean([r["novel"]["accuracy"] for r in seeds.values()]))
            bars.setdefault(_label(folder, method), []).append((f"{d} K={k}", base, novel, harmonic_mean(base, novel)))
    for entries in bars.values():
        if len(entries) > 1:
            base, novel = float(np.mean([e[1] for e in entries])), float(np.mean([e[2] for e in entries]))
            entries.append(("average", base, novel, harmonic_mean(base, novel)))
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
