"""A checkpoint before and after adapt.py on a new site's other images: adapt on 10 images per class, predict the
rest, averaged over 3 random draws.

    python benchmarks/site_benchmark.py --ckpt RUN/checkpoints/best.ckpt [--site FOLDER ...] [--shifted] [--draws 3]

Per site and model (unadapted, adapted): accuracy, the 90% sets' coverage, the share accepted and the accuracy of the
accepted answers, the failure AUROC of `confidence`, and whether the folder-level alarm fired on the predicted images
(means over the draws; the alarm as how many draws fired). The adaptation images are drawn by patient where the
site's MANIFEST.tsv names them (a patient's images all on one side). Sites: labelled folders (--site; default
actualmed-site), and with --shifted the composite acquisition shift of the test folder of
benchmarks/confidence_benchmark.py (the test folder's own images: it overlaps the main test set).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever is installed
sys.path.insert(0, str(ROOT / "benchmarks"))

from confidence_benchmark import DATA, write_shifted  # noqa: E402
from epoch_benchmark import cpu_name  # noqa: E402

from chestxray.data.images import ImageLimits  # noqa: E402
from chestxray.evaluation import selective  # noqa: E402
from chestxray.models import recalibrate, selection  # noqa: E402
from chestxray.models.checkpoints import load_model, preprocess_of  # noqa: E402
from chestxray.training import adapt as adapt_module  # noqa: E402

PER_CLASS = 10
KEYS = (
    "accuracy",
    "set_coverage",
    "share_accepted",
    "accuracy_accepted",
    "failure_auroc",
    "failure_auroc_flag_gate",
)


def draw(site: adapt_module.Site, seed: int) -> np.ndarray:
    """A boolean mask of the adaptation images: whole patient groups, in a seeded order, until each class has
    PER_CLASS images (a class never gets more than half of its images)."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(site.labels), bool)
    for c in np.unique(site.labels):
        want = min(PER_CLASS, int((site.labels == c).sum()) // 2)
        groups = np.unique(site.groups[site.labels == c])
        for g in rng.permutation(groups):
            if (chosen & (site.labels == c)).sum() >= want:
                break
            chosen |= (site.groups == g) & (site.labels == c)
    return chosen


def write_subset(site: adapt_module.Site, mask: np.ndarray, folder: Path) -> Path:
    """The chosen images as class-folder links, with a MANIFEST.tsv of their (integer) groups."""
    rows = []
    for k in np.flatnonzero(mask):
        path = site.paths[k]
        target = folder / path.parent.name / f"{k}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())
        rows.append({"path": f"{path.parent.name}/{target.name}", "patient": f"g{site.groups[k]}"})
    with open(folder / "MANIFEST.tsv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "patient"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def numbers_of(model, site: adapt_module.Site, mask: np.ndarray) -> dict:
    features = adapt_module.trunk_features(model, site.images[mask])
    outputs = recalibrate.outputs(model, adapt_module.head_logits(model, features), features)
    numbers = adapt_module.site_numbers(model.classes, site.labels[mask], outputs, model.pass_rate)
    # the baseline: the confidence gated by the flag itself (what a recalibrated checkpoint gave before the gate
    # kept the detector as training fitted it; the same for an unadapted checkpoint)
    kind = selection.check_settings(model.hparams.get("selective"))[0]
    by_flag = selection.confidence_of(outputs["probs"], kind, outputs["margin"])
    correct = outputs["probs"].argmax(1) == site.labels[mask]
    numbers["failure_auroc_flag_gate"] = selective.failure_auroc(by_flag, correct)
    return numbers


def run_site(ckpt: Path, folder: Path, draws: int, work: Path) -> dict[str, list[dict]]:
    model = load_model(ckpt)
    limits = ImageLimits(10**8, 32, preprocess=preprocess_of(model))
    site = adapt_module.read_site(folder, model, limits)
    results: dict[str, list[dict]] = {"unadapted": [], "adapted": [], "chosen": []}
    for seed in range(draws):
        mask = draw(site, seed)
        subset = write_subset(site, mask, work / f"{folder.name}_{seed}" / "site")
        out = work / f"{folder.name}_{seed}" / "adapt"
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("adapt", [f"ckpt={ckpt}", f"site={subset}", f"paths.output_dir={out}", "folds=3"])
        report = adapt_module.adapt(cfg)
        adapted = load_model(out / "checkpoints" / "adapted.ckpt")
        results["unadapted"].append(numbers_of(model, site, ~mask))
        results["adapted"].append(numbers_of(adapted, site, ~mask))
        results["chosen"].append(report["chosen"])
        results.setdefault("adapt_images", []).append(int(mask.sum()))
    return results


def mean(values: list) -> str:
    kept = [v for v in values if v is not None]
    return f"{np.mean(kept):.3f}" if kept else "n/a"


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    lines = [
        "| site | model | predicted | accuracy | set coverage | accepted | accuracy of accepted | failure AUROC | "
        "failure AUROC, gated by the flag (baseline) | alarm fired |",
        "|---" * 10 + "|",
    ]
    for site, r in results.items():
        for name in ("unadapted", "adapted"):
            runs = r[name]
            cells = [mean([m[k] for m in runs]) for k in KEYS]
            fired = sum(bool(m.get("alarm", {}).get("fired")) for m in runs)
            lines.append(
                f"| {site} | {name} | {mean([m['n'] for m in runs])} | "
                + " | ".join(cells)
                + f" | {fired}/{len(runs)} |"
            )
        lines.append(f"| {site} | chosen by adapt.py | {', '.join(r['chosen'])} (adapted on {r['adapt_images']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--site", type=Path, nargs="*", default=[DATA / "actualmed-site"])
    parser.add_argument("--test", type=Path, default=DATA / "covid19-image-dataset" / "test")
    parser.add_argument("--shifted", action="store_true")
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sites = list(args.site)
        if args.shifted:
            model = load_model(args.ckpt)
            sites.append(write_shifted(args.test, model.classes, work / "shifted-test"))
        for folder in sites:
            results[folder.name] = run_site(args.ckpt, folder, args.draws, work)
    print(f"checkpoint {args.ckpt}; {cpu_name()}")
    print(table(results))


if __name__ == "__main__":
    main()
