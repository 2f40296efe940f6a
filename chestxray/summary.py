"""One table per sweep: python -m chestxray.summary SWEEP_DIR (also written when a multirun ends).

summary.csv and summary.md in the sweep folder: a row per run with its overrides, val/acc_best, test accuracy with
its 95% interval, leak-free test accuracy and each evaluation set's accuracy, sorted by the optimised metric; an
exact McNemar test of the best run against each other run on the same test images (are the differences more than
noise?); and, for k-fold sweeps (runs that differ only in data.fold), each setting's mean and standard deviation
across folds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from scipy.stats import binomtest

from chestxray.runtime.console import REFUSED
from chestxray.runtime.files import atomic_write, atomic_writer

RESULTS = "results.json"  # written by train() in each run folder
SIGNIFICANCE = 0.05


def _load_run(folder: Path) -> dict | None:
    results = folder / RESULTS
    if not results.is_file():
        return None
    run = json.loads(results.read_text())
    overrides_file = folder / ".hydra" / "overrides.yaml"
    run["overrides"] = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    run["folder"] = folder
    run["reports"] = {}
    for metrics_file in [folder / "metrics.json", *sorted((folder / "eval").glob("*/metrics.json"))]:
        if metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            run["reports"][metrics.get("name", metrics_file.parent.name)] = metrics
    return run


def _correct_by_image(folder: Path) -> dict[str, bool]:
    """Per test image, whether the run got it right (from the report's predictions.csv)."""
    path = folder / "predictions.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["path"]: row["pred"] == row["label"] for row in csv.DictReader(fh) if row["label"]}


def mcnemar(a: dict[str, bool], b: dict[str, bool]) -> tuple[int, int, float] | None:
    """Exact McNemar test on the images both runs predicted: (a right b wrong, a wrong b right, two-sided p)."""
    shared = a.keys() & b.keys()
    if not shared:
        return None
    only_a = sum(a[k] and not b[k] for k in shared)
    only_b = sum(b[k] and not a[k] for k in shared)
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _acc(metrics: dict | None) -> tuple[float | None, str]:
    if not metrics or "accuracy" not in metrics:
        return None, ""
    lo, hi = metrics["accuracy_ci95"]
    return metrics["accuracy"], f"{metrics['accuracy']:.3f} ({lo:.3f}-{hi:.3f})"


def summarise(sweep: Path, metric: str | None = None) -> tuple[list[dict], list[str]]:
    """The table's rows (best first) and the Markdown lines below it; nothing is written."""
    # imported here: the Hydra callback is built at every start, keep it light
    from chestxray.evaluation.metrics import ACC, BEST, metric_name, set_prefix
    from chestxray.evaluation.report import leak_free

    metric = metric or BEST
    test, clean_acc = metric_name(set_prefix("test"), ACC), metric_name(set_prefix("test"), ACC, leak_free=True)

    runs = [r for r in (_load_run(p) for p in sorted(sweep.iterdir()) if p.is_dir()) if r]
    if not runs:
        return [], []
    descending = "loss" not in metric
    runs.sort(
        key=lambda r: (
            r["metrics"].get(metric) is None,
            -(r["metrics"].get(metric) or 0) if descending else (r["metrics"].get(metric) or 0),
        )
    )
    eval_names = sorted({n for r in runs for n in r["reports"] if n != "test"})
    best_correct = _correct_by_image(runs[0]["folder"])
    rows = []
    for run in runs:
        report = run["reports"].get("test")
        clean = leak_free(report) if report else None
        row = {
            "run": run["folder"].name,
            "overrides": " ".join(run["overrides"]),
            BEST: run["metrics"].get(BEST),
            test: _acc(report)[0],
            f"{test} (95% CI)": _acc(report)[1],
            clean_acc: _acc(clean)[0],
            f"{clean_acc} (95% CI)": _acc(clean)[1],
        }
        for name in eval_names:
            report = run["reports"].get(name)
            row[metric_name(set_prefix(name), ACC)] = _acc(report)[0]
            row[metric_name(set_prefix(name), ACC, leak_free=True)] = _acc(leak_free(report) if report else None)[0]
        test_vs_best = mcnemar(best_correct, _correct_by_image(run["folder"])) if run is not runs[0] else None
        row["McNemar p vs best (test)"] = test_vs_best[2] if test_vs_best else None
        rows.append(row)
    return rows, _notes(runs, rows, metric, [BEST, test, clean_acc])


def _notes(runs: list[dict], rows: list[dict], metric: str, averaged: list[str]) -> list[str]:
    lines = [f"Sorted by `{metric}`; best run: `{rows[0]['run']}`."]
    tied = [
        r["run"]
        for r in rows[1:]
        if r["McNemar p vs best (test)"] is not None and r["McNemar p vs best (test)"] >= SIGNIFICANCE
    ]
    if tied:
        lines.append(
            f"Not significantly different from the best on the test images (exact McNemar, p >= {SIGNIFICANCE}): "
            + ", ".join(f"`{t}`" for t in tied)
            + "."
        )
    groups = defaultdict(list)
    for run, row in zip(runs, rows, strict=True):
        if any(o.startswith("data.fold=") for o in run["overrides"]):
            setting = " ".join(o for o in run["overrides"] if not o.startswith("data.fold="))
            groups[setting].append(row)
    if groups:
        lines += ["", "## Cross-validation (mean ± standard deviation across folds)", ""]
        keys = [k for k in rows[0] if k in averaged or k.startswith("eval/")]
        lines += ["| setting | folds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
        for setting, members in groups.items():
            cells = []
            for k in keys:
                values = [m[k] for m in members if m[k] is not None]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}" if values else "")
            lines.append(f"| {setting or 'defaults'} | {len(members)} | " + " | ".join(cells) + " |")
    return lines


def refused_jobs(sweep: Path) -> dict[str, str]:
    """The sweep's job folders that hold no results because the job was refused: {job: its error line}."""
    refused = {}
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir() and not (p / RESULTS).is_file()):
        for log in sorted(folder.glob("*.log")):
            errors = [line for line in log.read_text(errors="replace").splitlines() if REFUSED in line]
            if errors:
                refused[folder.name] = errors[-1].split(" - ", 1)[-1]
    return refused


def write_summary(sweep: Path, metric: str | None = None) -> Path | None:
    """summary.csv and summary.md in the sweep folder (the refused jobs named below the table); None when no run of
    it has finished."""
    rows, notes = summarise(sweep, metric)
    if not rows:
        return None
    notes += [f"Refused (no results; its log says why): `{job}`: {error}" for job, error in refused_jobs(sweep).items()]
    with atomic_writer(sweep / "summary.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _fmt(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    shown = [k for k in rows[0] if f"{k} (95% CI)" not in rows[0]]  # the CI columns are shown instead
    common = set.intersection(*(set(r["overrides"].split()) for r in rows))
    lines = [f"# Sweep summary: `{sweep}`", ""]
    if common:
        lines += [f"Every run: `{' '.join(o for o in rows[0]['overrides'].split() if o in common)}`", ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        varying = " ".join(o for o in r["overrides"].split() if o not in common)
        cells = [
            varying if k == "overrides" else _fmt(r[k]) if isinstance(r[k], float) else str(r[k] or "") for k in shown
        ]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(sweep / "summary.md", "\n".join([*lines, "", *notes]) + "\n")
    return sweep / "summary.md"


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): writes the summary when a multirun ends; a sweep in which a job was
    refused exits 2 after it, naming each refused job."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir():
            return
        written = write_summary(sweep, config.get("optimized_metric"))
        if written:
            print(f"sweep summary: {written} and {written.with_suffix('.csv')}")
        refused = refused_jobs(sweep)
        for job, error in refused.items():
            print(f"sweep: job {job} refused: {error}", file=sys.stderr)
        if refused:
            sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestxray.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. outputs/train/multiruns/<time>")
    parser.add_argument("--metric", default=None, help="sort by this metric (default: val/acc_best)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"summary: error: not a folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    written = write_summary(args.sweep_dir, args.metric)
    if written is None:
        print(f"summary: error: no finished run (with {RESULTS}) in {args.sweep_dir}", file=sys.stderr)
        return 2
    print(written.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
