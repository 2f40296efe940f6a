"""The sweep summary: rows from each run's own files, sorted, paired tests, k-fold means."""

import csv
import json
import statistics

import pytest
import yaml

from chestxray.summary import main, mcnemar, write_summary

IMAGES = [f"test/img_{i:02d}.png" for i in range(40)]


def fake_run(folder, overrides, val_best, correct, leaking=()):
    """A finished run's files as train.py writes them: results.json, metrics.json, predictions.csv, overrides."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    n, k = len(IMAGES), sum(correct)
    clean = [c for c, p in zip(correct, IMAGES, strict=True) if p not in leaking]
    metrics = {
        "name": "test",
        "n": n,
        "correct": k,
        "accuracy": k / n,
        "accuracy_ci95": [k / n - 0.1, k / n + 0.1],
        "leak_free": {"n": len(clean), "accuracy": sum(clean) / len(clean), "accuracy_ci95": [0.1, 0.9]}
        if leaking
        else None,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    results = {"metrics": {"val/acc_best": val_best, "test/acc": k / n}}
    (folder / "results.json").write_text(json.dumps(results))
    with open(folder / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "pred"])
        for path, ok in zip(IMAGES, correct, strict=True):
            writer.writerow([path, "Covid", "Covid" if ok else "Normal"])
    return metrics


def test_mcnemar_counts_discordant_pairs():
    a = {f"x{i}": i < 30 for i in range(40)}
    b = {f"x{i}": i < 10 for i in range(40)}
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (20, 0) and p < 1e-5
    assert mcnemar(a, a) == (0, 0, 1.0)
    assert mcnemar(a, {}) is None


def test_summary_rows_equal_each_runs_files_sorted_with_significance(tmp_path):
    sweep = tmp_path / "sweep"
    good = fake_run(sweep / "0", ["optimizer.lr=0.01"], 0.80, [True] * 36 + [False] * 4, leaking=IMAGES[:5])
    close = fake_run(sweep / "1", ["optimizer.lr=0.001"], 0.78, [True] * 35 + [False] * 5)
    poor = fake_run(sweep / "2", ["optimizer.lr=0.1"], 0.90, [True] * 12 + [False] * 28)
    write_summary(sweep)
    with open(sweep / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["2", "0", "1"]  # by val/acc_best, best first
    by_run = {r["run"]: r for r in rows}
    for run, metrics in (("0", good), ("1", close), ("2", poor)):
        assert float(by_run[run]["test/acc"]) == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert float(by_run["0"]["test/acc_leak_free"]) == pytest.approx(good["leak_free"]["accuracy"], abs=1e-4)
    assert float(by_run["1"]["test/acc_leak_free"]) == pytest.approx(close["accuracy"], abs=1e-4)  # no leaks
    assert by_run["0"]["overrides"] == "optimizer.lr=0.01"
    # the best by val/acc_best (run 2) is far worse on test than the others: significant
    assert float(by_run["0"]["McNemar p vs best (test)"]) < 0.05 and by_run["2"]["McNemar p vs best (test)"] == ""
    markdown = (sweep / "summary.md").read_text()
    assert "Sorted by `val/acc_best`; best run: `2`" in markdown


def test_fold_runs_get_a_mean_and_standard_deviation(tmp_path, capsys):
    sweep = tmp_path / "folds"
    accuracies = []
    for fold in range(3):
        correct = [True] * (30 + fold) + [False] * (10 - fold)
        accuracies.append(sum(correct) / len(correct))
        fake_run(sweep / str(fold), [f"data.fold={fold}", "optimizer.lr=0.01"], 0.7 + fold / 100, correct)
    assert main([str(sweep)]) == 0
    markdown = (sweep / "summary.md").read_text()
    assert "## Cross-validation" in markdown
    line = next(x for x in markdown.splitlines() if x.startswith("| optimizer.lr=0.01 | 3 |"))
    mean, sd = statistics.mean(accuracies), statistics.stdev(accuracies)
    assert f"{mean:.3f} ± {sd:.3f}" in line
    assert "Cross-validation" in capsys.readouterr().out
    assert main([str(tmp_path / "none")]) == 2
