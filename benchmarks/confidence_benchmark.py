"""Which confidence tracks a checkpoint's mistakes: the candidates for predictions.csv's `confidence` compared by
failure AUROC (how often a right answer is more confident than a wrong one; 0.5 is chance) and AURC (the mean error
rate over every coverage; lower is better) on the run's validation split, its test folder, and shifted sites.

    python benchmarks/confidence_benchmark.py --ckpt RUN/checkpoints/best.ckpt [--site FOLDER ...] [--shifted]

Candidates (chestxray.evaluation.selective): max_probability, margin, doctor (of the calibrated probabilities),
neg_energy (logsumexp of the calibrated logits), the detector's own score (minus ood_score: what the issue measured),
and max_probability gated by the detector (a flagged answer ranks below every passed one: what `accepted` does).
Shifted sites: any labelled folders (--site, e.g. actualmed-site: two classes), and with --shifted a composite
acquisition shift of the test folder (chestxray.evaluation.robustness's contrast, gamma, blur and noise at level 3;
it is the test folder's images, so it overlaps the test set). Nothing is refitted: the checkpoint's own temperature
and detector.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever is installed

from chestxray.data.images import ImageLimits, load_image  # noqa: E402
from chestxray.data.sources import find_inputs  # noqa: E402
from chestxray.evaluation import selective  # noqa: E402
from chestxray.evaluation.robustness import SHIFTS  # noqa: E402
from chestxray.models.checkpoints import load_model, preprocess_of  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
COMPOSITE = (("contrast", 3), ("gamma", 3), ("blur", 3), ("noise", 3))


def composite_shift(image: np.ndarray, image_size: int, seed: int) -> np.ndarray:
    """A full-resolution RGB decode under COMPOSITE's shifts, one after the other (an older, noisier device)."""
    for name, level in COMPOSITE:
        image = SHIFTS[name].apply(image, level, image_size, seed)
    return image


def write_shifted(test: Path, classes: list[str], folder: Path) -> Path:
    """The test folder under the composite shift, as PNG class folders in `folder` (outside the repository)."""
    import cv2

    from chestxray.data.images import decode_bytes, read_bytes

    for k, item in enumerate(find_inputs(str(test), classes)):
        image = decode_bytes(read_bytes(item.path), item.path, 1024)
        shifted = composite_shift(image, 1024, k)
        target = folder / item.path.parent.name / f"{item.path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.cvtColor(shifted, cv2.COLOR_RGB2BGR))
    return folder


def validation_images(ckpt: Path, model) -> tuple[torch.Tensor, np.ndarray] | None:
    """The run's own validation split (its .hydra/config.yaml's data group, set up again), or None."""
    from hydra.utils import instantiate

    config = ckpt.resolve().parent.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    data = OmegaConf.load(config).data
    with tempfile.TemporaryDirectory() as tmp:
        # with the leakage check, as the run: it groups near-duplicates, and so decides the split
        overrides = {"report_dir": tmp, "store": "memory", "eval_sets": {}, "download": False}
        data = OmegaConf.merge(data, overrides)
        data.seed = OmegaConf.load(config).seed
        datamodule = instantiate(data)
        datamodule.setup("fit")
        val = datamodule.datasets["val"]
        images = torch.stack([val[i][0] for i in range(len(val))])
        return images, np.asarray(val.labels)


def folder_images(folder: Path, model, limits: ImageLimits) -> tuple[torch.Tensor, np.ndarray]:
    inputs = [i for i in find_inputs(str(folder), model.classes) if i.label is not None]
    size = int(model.hparams.image_size)
    images = torch.stack([torch.from_numpy(load_image(i.path, size, limits)) for i in inputs])
    return images, np.array([i.label for i in inputs])


@torch.no_grad()
def candidates(model, images: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """({candidate: confidence}, predictions, flagged) of uint8 images."""
    parts = [model.logits_and_features(images[k : k + 32]) for k in range(0, len(images), 32)]
    raw = torch.cat([p[0] for p in parts]).float()
    features = torch.cat([p[1] for p in parts]).float()
    probs, margin, _, gate = model.answers_of(raw, features)
    probs, margin, gate = probs.double().numpy(), margin.double().numpy(), gate.double().numpy()
    calibrated = (raw / model.temperature).double().numpy()
    msp = selective.max_probability(probs)
    passes = ~(margin > 0)
    scores = {
        "max_probability": msp,
        "margin": selective.margin(probs),
        "doctor": selective.doctor(probs),
        "neg_energy": selective.neg_energy(calibrated),
        "minus ood_score": -margin,
        "max_probability_gated (flagged last)": np.where(gate > 0, msp - 1.0, msp),
    }
    return scores, probs.argmax(1), ~passes


def measure(model, images: torch.Tensor, labels: np.ndarray) -> dict:
    scores, preds, flagged = candidates(model, images)
    correct = preds == labels
    result = {
        "n": len(labels),
        "accuracy": float(correct.mean()),
        "flagged": float(flagged.mean()),
        "wrong": int((~correct).sum()),
        "candidates": {
            name: {"failure_auroc": selective.failure_auroc(c, correct), "aurc": selective.aurc(c, correct)}
            for name, c in scores.items()
        },
    }
    alarm = selective.shift_alarm(int(flagged.sum()), len(labels), model.pass_rate)
    result["alarm"] = alarm.fired
    return result


def table(results: dict[str, dict]) -> str:
    sets = list(results)
    names = list(next(iter(results.values()))["candidates"])
    head = "| confidence | " + " | ".join(f"{s} AUROC / AURC" for s in sets) + " |"
    lines = [head, "|---" * (len(sets) + 1) + "|"]
    for name in names:
        cells = [
            f"{results[s]['candidates'][name]['failure_auroc']:.3f} / {results[s]['candidates'][name]['aurc']:.3f}"
            for s in sets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    facts = " | ".join(
        f"n {r['n']}, acc {r['accuracy']:.3f}, {r['wrong']} wrong, flagged {r['flagged']:.0%}, alarm "
        f"{'yes' if r['alarm'] else 'no'}"
        for r in results.values()
    )
    lines.append(f"| (set) | {facts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--test", type=Path, default=DATA / "covid19-image-dataset" / "test")
    parser.add_argument("--site", type=Path, nargs="*", default=[DATA / "actualmed-site"])
    parser.add_argument("--shifted", action="store_true", help="add the composite shift of the test folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(args.ckpt)
    limits = ImageLimits(10**8, 32, preprocess=preprocess_of(model))
    results: dict[str, dict] = {}
    val = validation_images(args.ckpt, model)
    if val is not None:
        results["validation"] = measure(model, *val)
    results["test"] = measure(model, *folder_images(args.test, model, limits))
    for site in args.site:
        results[site.name] = measure(model, *folder_images(site, model, limits))
    if args.shifted:
        with tempfile.TemporaryDirectory() as tmp:
            shifted = write_shifted(args.test, model.classes, Path(tmp))
            results["shifted test"] = measure(model, *folder_images(shifted, model, limits))
    print(f"checkpoint {args.ckpt}; {platform.processor() or platform.machine()}")
    print(table(results))


if __name__ == "__main__":
    main()
