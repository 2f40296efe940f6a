"""What proving a decoded-image store's bytes costs: every row's CRC-32 checked on every read, against no check.

    python benchmarks/store_checksum.py [--images 16000] [--epochs-size 32] [--loader-size 224]

Builds disk stores of N generated images (chestxray.synthetic, distinct grey JPEGs) and measures, in one process
each, with the check on and off side by side:
1. a training epoch over all N images with this project's Trainer (VGG19 from scratch, batch 4, no validation), at
   --epochs-size px: four epochs in the order off, on, on, off (a drift of the machine's speed cancels out);
2. the data path alone at --loader-size px (the train DataLoader read to the end, no model): the worst case, as
   if the model cost nothing; round after round, off and on alternating.
The ratio on/off is the cost. The target (issue 18): at most 5% on a 16,000-image epoch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def datamodule(data: Path, size: int, cache: Path):
    import warnings

    from chestxray.data.datamodule import ChestXrayDataModule

    dm = ChestXrayDataModule(
        str(data),
        image_size=size,
        store="disk",
        cache_dir=str(cache),
        check_leakage=False,
        download=False,
        val_fraction=0.01,
        num_workers=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    return dm


def set_verify(dm, on: bool) -> None:
    for dataset in [*dm.datasets.values(), *dm.test_sets.values()]:
        dataset.images.verify = on


def loader_passes(data: Path, size: int, cache: Path, rounds: int) -> dict[str, float]:
    """Seconds to read the train loader to the end (batch 4, no workers), check off and on, alternating rounds."""
    dm = datamodule(data, size, cache)
    times: dict[str, list[float]] = {"off": [], "on": []}
    for k in range(rounds * 2 + 1):
        mode = ("off", "on")[k % 2]
        set_verify(dm, mode == "on")
        start = time.perf_counter()
        n = sum(len(batch[0]) for batch in dm.train_dataloader())
        if k:  # the first pass warms the page cache
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) for mode, t in times.items()} | {"images": n}


def training_epochs(data: Path, size: int, cache: Path, precision: str) -> dict[str, float]:
    """Four training epochs of the project's Trainer over every train image, the check off, on, on, off."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from chestxray.training.fit import build

    order = ["off", "on", "on", "off"]
    overrides = [
        f"data.data_dir={data}",
        f"data.image_size={size}",
        "data.store=disk",
        f"data.cache_dir={cache}",
        "data.check_leakage=false",
        "data.val_fraction=0.01",
        "model.pretrained=false",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={len(order)}",
        "trainer.limit_val_batches=0",
        f"trainer.precision={precision}",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "model.calibrate=false",
        "~logger",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.run_figures=null",
        f"paths.output_dir={cache / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    dm, model, trainer = build(cfg)
    dm.setup()

    class Toggle(L.Callback):
        def __init__(self):
            self.seconds: dict[str, list[float]] = {"off": [], "on": []}

        def on_train_epoch_start(self, trainer, pl_module):
            set_verify(dm, order[trainer.current_epoch] == "on")
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds[order[trainer.current_epoch]].append(time.perf_counter() - self.start)

    toggle = Toggle()
    trainer.callbacks.append(toggle)
    trainer.fit(model, datamodule=dm)
    return {mode: statistics.mean(t) for mode, t in toggle.seconds.items()} | {"images": len(dm.datasets["train"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--epochs-size", type=int, default=32, help="image size of the training epochs")
    parser.add_argument("--loader-size", type=int, default=224, help="image size of the data-path passes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, help="folder for the images and stores (default: a temporary one)")
    parser.add_argument("--precision", default="32-true", help="of the training epochs (bf16-mixed: faster steps)")
    parser.add_argument("--role", choices=["epochs", "loader"])
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="chestxray-checksum-"))
    data, cache = work / "data", work / "cache"
    if args.role == "epochs":
        print("RESULT", training_epochs(data, args.size, cache, args.precision))
        return
    if args.role == "loader":
        print("RESULT", loader_passes(data, args.size, cache, args.rounds))
        return
    from chestxray.synthetic import make_dataset

    per_class = args.images // 3
    if not (data / "train").is_dir():
        print(f"generating {3 * per_class} train and 30 test images in {data}", file=sys.stderr, flush=True)
        make_dataset(data, {"train": per_class, "test": 10}, size=256, mixed=False)
    results = {}
    for role, size in (("epochs", args.epochs_size), ("loader", args.loader_size)):
        cmd = [sys.executable, __file__, "--role", role, "--size", str(size), "--work", str(work)]
        cmd += ["--rounds", str(args.rounds), "--precision", args.precision]
        print(f"running {role} at {size} px", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
        results[role] = eval(line.removeprefix("RESULT "))  # noqa: S307 - our own child's dict
    from benchmarks.epoch_benchmark import cpu_name

    epochs, loader = results["epochs"], results["loader"]
    print(f"\n{cpu_name()}; {epochs['images']:,} train images\n")
    print("| measurement | check off, s | check on, s | on / off |\n|---|---:|---:|---:|")
    print(
        f"| training epoch, {args.epochs_size} px, {args.precision}, VGG19 batch 4 (mean of 2 each, off-on-on-off) | "
        f"{epochs['off']:.1f} | {epochs['on']:.1f} | {epochs['on'] / epochs['off']:.3f} |"
    )
    print(
        f"| data path alone, {args.loader_size} px (median of {args.rounds}; no model: the worst case) | "
        f"{loader['off']:.3f} | {loader['on']:.3f} | {loader['on'] / loader['off']:.3f} |"
    )
    per_image = (loader["on"] - loader["off"]) / loader["images"] * 1e6
    print(f"\nthe check costs {per_image:.0f} us per {args.loader_size} px image on the data path")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
