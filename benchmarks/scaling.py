"""From 1,000 to 16,000 images: time per image and peak memory of the audit, training and predict.py.

    python benchmarks/scaling.py [--sizes 1000 4000 16000] [--image-size 32] [--side 768] [--work DIR]

Generates N distinct radiograph-like grey JPEGs (chestxray.synthetic, --side pixels square; the audit must find
no near-duplicates among them) in DATA/{train,test}/<class>/ (90% / 10%), then for each N runs each stage in a
fresh process, one after the other:

- audit: python -m chestxray.audit DATA (decode every file in full, hash, search for duplicates);
- train: the data module's decode (data.store=disk) and leakage check, plus one epoch with model.freeze=features
  at --image-size px (test=false);
- predict: predict.py on every file of DATA at --image-size px (a random-weights checkpoint; speed does not
  depend on the weights).

Memory: the stage's process reports its peak RSS (the kernel's VmHWM, exact); the parent samples the whole
process tree every 100 ms from /proc/<pid>/smaps_rollup for the PSS of all its processes (pages shared by a
forked loader worker or the memory-mapped store counted once) and their anonymous (private) PSS, which the
decoded images must not add to. Then one table.
"stage, s" is the stage's own time inside the process (after interpreter start-up and imports, which cost the
same at every N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Normal", "Covid", "Viral Pneumonia"]
STAGES = ("audit", "train", "predict")


# --- the child: one stage, timed from the inside ------------------------------------------------------------------


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides)


def run_stage(stage: str, data: Path, out: Path, image_size: int, ckpt: Path) -> dict:
    start = time.perf_counter()
    result: dict = {}
    if stage == "audit":
        from chestxray.audit import main

        main([str(data), "--out", str(out)])
        summary = json.loads((out / "audit.json").read_text())["summary"]
        result["near_duplicates"] = summary["near_duplicate_pairs"] + summary["exact_duplicate_pairs"]
    elif stage == "train":
        from chestxray.training.fit import train

        cfg = compose(
            "train",
            [
                f"data.data_dir={data}",
                f"data.image_size={image_size}",
                "data.store=disk",
                "model.pretrained=false",
                "model.freeze=features",
                "trainer.accelerator=cpu",
                "trainer.max_epochs=1",
                "+trainer.enable_progress_bar=false",
                "callbacks.progress_bar=null",
                "test=false",
                f"paths.output_dir={out}",
            ],
        )
        train(cfg)
    else:
        from chestxray.inference.predict import predict

        cfg = compose(
            "predict",
            [f"ckpt={ckpt}", f"inputs={data}", "trainer.accelerator=cpu", f"paths.output_dir={out}", "print_limit=0"],
        )
        result["predicted"] = predict(cfg)["predicted"]
    result["seconds"] = time.perf_counter() - start
    with open("/proc/self/status") as fh:  # the kernel's high-water mark: exact, however short the peak
        result["hwm_mb"] = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    return result


# --- the parent: data, processes, memory ------------------------------------------------------------------------


def make_data(work: Path, sizes: list[int], side: int) -> dict[int, Path]:
    """The largest set once; each smaller N as hard links to its first files (same images, same proportions)."""
    from chestxray.synthetic import make_dataset

    largest = max(sizes)
    full = work / f"n{largest}"
    per_class = {"train": round(largest * 0.9 / 3), "test": round(largest * 0.1 / 3)}
    if not full.exists():
        start = time.perf_counter()
        make_dataset(full, per_class, size=side, mixed=False, seed=0)
        print(f"generated {largest:,} images of {side} x {side} in {time.perf_counter() - start:.0f} s", flush=True)
    folders = {largest: full}
    for n in sizes:
        if n == largest:
            continue
        folder = work / f"n{n}"
        if not folder.exists():
            for split, count in per_class.items():
                for name in CLASSES:
                    source = sorted((full / split / name).iterdir())[: round(count * n / largest)]
                    (folder / split / name).mkdir(parents=True)
                    for f in source:
                        os.link(f, folder / split / name / f.name)
        folders[n] = folder
    return folders


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        p = queue.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    queue += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return pids


def _memory_kb(pids: list[int]) -> tuple[int, int, int]:
    """(RSS of the first process, PSS of all, anonymous PSS of all): PSS splits pages shared between processes
    (a forked DataLoader worker, the memory-mapped store) among them instead of counting them in each."""
    main_rss = pss = anon = 0
    for i, p in enumerate(pids):
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key == "Rss" and i == 0:
                        main_rss = int(value.split()[0])
                    elif key == "Pss":
                        pss += int(value.split()[0])
                    elif key == "Pss_Anon":
                        anon += int(value.split()[0])
        except (OSError, ValueError):
            pass
    return main_rss, pss, anon


def measure(stage: str, data: Path, out: Path, image_size: int, ckpt: Path) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--data", str(data), "--out", str(out)]
    cmd += ["--image-size", str(image_size), "--ckpt", str(ckpt)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    peak = [0, 0, 0]
    while proc.poll() is None:
        peak = [max(a, b) for a, b in zip(peak, _memory_kb(_tree(proc.pid)), strict=True)]
        time.sleep(0.1)
    wall = time.perf_counter() - start
    lines = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{stage} on {data} failed with status {proc.returncode}")
    _, pss, anon = (kb / 1024 for kb in peak)
    result = json.loads(lines[-1])
    return {**result, "wall": wall, "rss_mb": result["hwm_mb"], "pss_mb": pss, "anon_mb": anon}


def report(results: dict, sizes: list[int]) -> str:
    lines = [
        "| stage | files | whole process, s | stage, s | stage, ms per image | peak RSS, MB | peak PSS (all "
        "processes), MB | peak anonymous PSS, MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        for n in sizes:
            r = results[stage][n]
            lines.append(
                f"| {stage} | {n:,} | {r['wall']:.1f} | {r['seconds']:.1f} | {1000 * r['seconds'] / n:.2f} | "
                f"{r['rss_mb']:,.0f} | {r['pss_mb']:,.0f} | {r['anon_mb']:,.0f} |"
            )
    lo, hi = min(sizes), max(sizes)
    per_image = {s: [results[s][n]["seconds"] / n for n in (lo, hi)] for s in STAGES}
    lines += ["", f"Targets ({lo:,} -> {hi:,} files):"]
    audit = results["audit"]
    lines.append(
        f"- audit peak RSS at {hi:,}: {audit[hi]['rss_mb']:,.0f} MB (target <= 1,536) and "
        f"{audit[hi]['rss_mb'] / audit[lo]['rss_mb']:.2f}x its value at {lo:,} (target <= 1.3x)"
    )
    if lo * 4 in sizes:
        pred = results["predict"]
        lines.append(
            f"- predict.py peak PSS (with its loader worker) at {lo * 4:,} / at {lo:,}: "
            f"{pred[lo * 4]['pss_mb'] / pred[lo]['pss_mb']:.2f}x (target <= 1.2x)"
        )
    train = results["train"]
    lines.append(
        f"- training anonymous (private) memory at {hi:,} / at {lo:,}: "
        f"{train[hi]['anon_mb'] / train[lo]['anon_mb']:.2f}x "
        f"({train[lo]['anon_mb']:,.0f} -> {train[hi]['anon_mb']:,.0f} MB; the decoded images are in the shared store)"
    )
    for stage, (a, b) in per_image.items():
        lines.append(f"- {stage}: time per image at {hi:,} / at {lo:,}: {b / a:.2f}x (target within 1.5x)")
    dupes = {n: results["audit"][n]["near_duplicates"] for n in sizes}
    lines.append(f"- duplicates the audit found among the generated images: {dupes} (must be 0)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--side", type=int, default=768, help="side of the generated JPEGs (768)")
    parser.add_argument("--work", type=Path, help="folder for the images and outputs (default: a temporary one)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.data, args.out, args.image_size, args.ckpt)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="chestxray-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["CHESTXRAY_CACHE"] = str(work / "cache")  # a cold store for each N: every run decodes
    sizes = sorted(args.sizes)
    folders = make_data(work, sizes, args.side)
    from benchmarks.predict_benchmark import random_checkpoint

    ckpt = random_checkpoint(work, args.image_size)
    results: dict = {stage: {} for stage in STAGES}
    for n in sizes:
        for stage in STAGES:
            out = work / "out" / f"{stage}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            results[stage][n] = measure(stage, folders[n], out, args.image_size, ckpt)
            r = results[stage][n]
            print(f"{stage:>8} {n:>7,} files: {r['seconds']:7.1f} s, peak RSS {r['rss_mb']:7,.0f} MB", flush=True)
    what = f"{args.side} x {args.side} grey JPEGs, model input {args.image_size} px, {os.cpu_count()} CPUs"
    print(f"\n{sizes} files, {what}\n")
    print(report(results, sizes))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
