"""Dataset audit: python -m chestxray.audit DATA_DIR [--out FOLDER] [--threshold BITS].

Counts, formats, channel modes, bit depths and sizes per split and class; unreadable files; exact duplicates
(same bytes) and near-duplicates (same picture re-encoded, resized or contrast-changed), within and across
splits. Cross-split pairs are train/test leakage. Writes audit.md and audit.json and prints a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data import DEFAULT_CLASSES, SPLITS, DataError, scan_split
from chestxray.duplicates import DEFAULT_THRESHOLD, near_pairs, perceptual_hash
from chestxray.images import BadImageError, decode_raw, read_bytes, to_rgb8


@dataclass
class FileRecord:
    path: Path
    split: str
    label: str
    bytes: int = 0
    sha256: str = ""
    format: str = ""
    mode: str = ""
    bit_depth: int = 0
    width: int = 0
    height: int = 0
    error: str = ""
    phash: object = field(default=None, repr=False)


def inspect_file(path: Path, split: str, label: str) -> FileRecord:
    """One full decode per file gives its mode, depth and size, validates it, and feeds the perceptual hash."""
    record = FileRecord(path, split, label)
    try:
        data = read_bytes(path)
        record.bytes = len(data)
        record.sha256 = hashlib.sha256(data).hexdigest()
        image, record.format = decode_raw(data, path)
    except BadImageError as err:
        record.error = err.reason
        return record
    channels = 1 if image.ndim == 2 else image.shape[2]
    record.mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels} channels")
    record.bit_depth = 16 if image.dtype == np.uint16 else 8
    record.height, record.width = image.shape[:2]
    record.phash = perceptual_hash(to_rgb8(image))
    return record


def scan(data_dir: Path, classes=DEFAULT_CLASSES) -> list[FileRecord]:
    jobs = []
    for split in SPLITS:
        paths, labels = scan_split(data_dir / split, classes)
        jobs += [(p, split, classes[y]) for p, y in zip(paths, labels, strict=True)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: inspect_file(*job), jobs))


def _group_stats(records: list[FileRecord]) -> dict:
    good = [r for r in records if not r.error]
    stats = {
        "count": len(records),
        "unreadable": len(records) - len(good),
        "formats": dict(Counter(r.format for r in good)),
        "modes": dict(Counter(r.mode for r in good)),
        "bit_depths": dict(Counter(str(r.bit_depth) for r in good)),
    }
    if good:
        stats["width"] = [min(r.width for r in good), max(r.width for r in good)]
        stats["height"] = [min(r.height for r in good), max(r.height for r in good)]
    return stats


def exact_duplicate_groups(records: list[FileRecord]) -> list[list[Path]]:
    """Files with identical bytes, grouped by the SHA-256 taken while inspecting them."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for r in records:
        if r.sha256:
            groups[r.sha256].append(r.path)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def audit(data_dir: Path, threshold: int = DEFAULT_THRESHOLD, classes=DEFAULT_CLASSES) -> dict:
    """Everything the report shows, as plain data."""
    records = scan(data_dir, classes)
    split_of = {r.path: r.split for r in records}
    rel = {r.path: str(r.path.relative_to(data_dir)) for r in records}
    exact = exact_duplicate_groups([r for r in records if not r.error])
    exact_pairs = {frozenset((a, b)) for g in exact for i, a in enumerate(g) for b in g[i + 1 :]}
    hashes = {r.path: r.phash for r in records if r.phash is not None}
    near = [p for p in near_pairs(hashes, None, threshold) if frozenset((p.train, p.test)) not in exact_pairs]
    near_rows = [
        {
            "a": rel[p.train],
            "b": rel[p.test],
            "distance_bits": p.distance,
            "cross_split": split_of[p.train] != split_of[p.test],
        }
        for p in near
    ]
    exact_rows = [{"files": [rel[p] for p in g], "cross_split": len({split_of[p] for p in g}) > 1} for g in exact]
    per_group = {
        split: {c: _group_stats([r for r in records if r.split == split and r.label == c]) for c in classes}
        for split in SPLITS
    }
    exact_cross_pairs = sum(1 for pair in exact_pairs if len({split_of[p] for p in pair}) > 1)
    return {
        "data_dir": str(data_dir),
        "threshold_bits": threshold,
        "hash": "imagehash.phash, hash_size=16 (256 bits), of the grey image resized to 128x128",
        "files": len(records),
        "per_split_class": per_group,
        "bad_files": [{"path": rel[r.path], "reason": r.error} for r in records if r.error],
        "exact_duplicates": exact_rows,
        "near_duplicates": near_rows,
        "summary": {
            "bad_files": sum(1 for r in records if r.error),
            "exact_duplicate_groups": len(exact),
            "exact_duplicate_pairs": len(exact_pairs),
            "exact_duplicate_pairs_train_test": exact_cross_pairs,
            "near_duplicate_pairs": len(near_rows),
            "near_duplicate_pairs_train_test": sum(r["cross_split"] for r in near_rows),
        },
    }


def to_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"# Dataset audit: `{report['data_dir']}`",
        "",
        f"{report['files']} files; {s['bad_files']} unreadable; {s['exact_duplicate_groups']} groups of exact "
        f"duplicates ({s['exact_duplicate_pairs']} pairs, {s['exact_duplicate_pairs_train_test']} across train/test); "
        f"{s['near_duplicate_pairs']} further near-duplicate pairs ({s['near_duplicate_pairs_train_test']} across "
        f"train/test). Near-duplicate: {report['hash']}, at most {report['threshold_bits']} bits apart.",
        "",
        "## Per split and class",
        "",
        "| split | class | files | unreadable | formats | modes | bit depths | width | height |",
        "|---|---|---:|---:|---|---|---|---|---|",
    ]
    for split, by_class in report["per_split_class"].items():
        for name, st in by_class.items():
            fmt = ", ".join(f"{k} {v}" for k, v in st["formats"].items())
            modes = ", ".join(f"{k} {v}" for k, v in st["modes"].items())
            bits = ", ".join(f"{k}-bit {v}" for k, v in st["bit_depths"].items())
            w = "–".join(map(str, st.get("width", [])))
            h = "–".join(map(str, st.get("height", [])))
            lines.append(
                f"| {split} | {name} | {st['count']} | {st['unreadable']} | {fmt} | {modes} | {bits} | {w} | {h} |"
            )
    lines += ["", "## Unreadable files", ""]
    lines += [f"- `{b['path']}`: {b['reason']}" for b in report["bad_files"]] or ["None."]
    lines += ["", "## Exact duplicates (same bytes)", ""]
    lines += [
        f"- {'**train/test leakage**: ' if g['cross_split'] else ''}" + ", ".join(f"`{f}`" for f in g["files"])
        for g in report["exact_duplicates"]
    ] or ["None."]
    lines += ["", "## Near-duplicates (same picture, different bytes)", ""]
    lines += [
        f"- {'**train/test leakage**: ' if r['cross_split'] else ''}`{r['a']}` ~ `{r['b']}` ({r['distance_bits']} bits)"
        for r in report["near_duplicates"]
    ] or ["None."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestxray.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="folder with train/<class>/ and test/<class>/")
    parser.add_argument("--out", type=Path, default=Path("outputs/audit"), help="report folder (outputs/audit)")
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="near-duplicate distance, bits")
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = audit(args.data_dir, args.threshold, args.classes)
    except DataError as err:
        print(f"audit: error: {err}", file=sys.stderr)
        return 2
    report["warnings"] = [str(w.message) for w in caught]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(json.dumps(report, indent=2))
    (args.out / "audit.md").write_text(to_markdown(report))
    for w in report["warnings"]:
        print(f"warning: {w}")
    s = report["summary"]
    print(f"audited {report['files']} files in {time.perf_counter() - start:.1f} s")
    for key, value in s.items():
        print(f"  {key.replace('_', ' ')}: {value}")
    for r in report["near_duplicates"]:
        if r["cross_split"]:
            print(f"  leak: {r['a']} ~ {r['b']} ({r['distance_bits']} bits)")
    for g in report["exact_duplicates"]:
        if g["cross_split"]:
            print(f"  leak (identical bytes): {' = '.join(g['files'])}")
    print(f"report: {args.out / 'audit.md'} and {args.out / 'audit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
