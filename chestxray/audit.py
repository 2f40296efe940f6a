"""Dataset audit: python -m chestxray.audit DATA [--against OTHER] [--out FOLDER] [--threshold BITS].

DATA is a folder with train/<class>/ and test/<class>/, a folder of class folders (one labelled set), or a label
file (CSV path,label[,split]). Counts, formats, channel modes, bit depths and sizes per split and class;
unreadable files; exact duplicates (same bytes) and near-duplicates (same picture re-encoded, resized or
contrast-changed), within and across splits; patients with images in both train and test (DICOM PatientID, or a
label file's patient column, compared but never written). Cross-split pairs and shared patients are train/test
leakage. With --against OTHER, the
images the two datasets share. Writes audit.md and audit.json and prints a summary.

Files are read and hashed in parallel threads and nothing but a 32-byte hash per file is kept, so memory stays
flat from 300 files to 100,000; the near-duplicate search is the blocked XOR + popcount of chestxray.data.duplicates.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data import dicom
from chestxray.data.duplicates import DEFAULT_THRESHOLD, HASH_BYTES, near_pairs, perceptual_hash
from chestxray.data.images import BadImageError, decode, read_bytes
from chestxray.data.sources import DEFAULT_CLASSES, SPLITS, read_index, scan_class_folders
from chestxray.errors import DataError, OutputDirError
from chestxray.runtime.files import atomic_write, numbered
from chestxray.runtime.parallel import available_cpus, bounded_map

WHOLE = "all"  # the split name of a dataset without train/test splits


@dataclass(slots=True)  # one per file, 100,000 of them: no per-object __dict__
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
    phash: bytes | None = field(default=None, repr=False)  # 32 bytes, packed
    # whose image: a label file's patient column, else a DICOM file's opaque key (chestxray.data.dicom.patient_key);
    # kept in memory to find patients on both sides of train/test, never written out or printed
    patient: str | None = field(default=None, repr=False)


def inspect_file(path: Path, split: str, label: str, patient: str | None = None) -> FileRecord:
    """One full decode per file (the decode every reader uses) gives its mode, significant bits and size, validates
    it, and feeds the perceptual hash; the patient is the listed one, else a DICOM file's opaque key."""
    record = FileRecord(path, split, label, patient=patient)
    try:
        data = read_bytes(path)
        record.bytes = len(data)
        record.sha256 = hashlib.sha256(data).hexdigest()
        decoded = decode(data, path)
    except BadImageError as err:
        record.error = err.reason
        return record
    info = decoded.header.dicom
    record.format = f"DICOM {info.modality}" if info else decoded.header.format
    record.mode = decoded.mode
    record.bit_depth = decoded.bits
    record.height, record.width = decoded.image.shape[:2]
    record.phash = perceptual_hash(decoded.image).tobytes()
    if record.patient is None and info is not None:
        record.patient = dicom.patient_key(path)
    return record


def dataset_files(
    data: Path, classes=DEFAULT_CLASSES, setting: str = "DATA"
) -> list[tuple[Path, str, str, str | None]]:
    """(path, split, class, listed patient) of every file: train/test folders or one folder of class folders (some of
    the classes in each: a hospital's images need not hold every class, though a misnamed folder is refused), or a
    label file (its patient column, if any)."""
    if data.is_file() or data.suffix.lower() == ".csv":
        groups = {split or WHOLE: files for split, files in read_index(data, classes, setting).items()}
    elif not data.is_dir():
        raise DataError(f"{setting}={data}: not found (a dataset folder or a label file)")
    elif (data / "train").is_dir() or (data / "test").is_dir():
        groups = {split: scan_class_folders(data / split, classes, setting, missing_ok=True) for split in SPLITS}
    else:
        groups = {WHOLE: scan_class_folders(data, classes, setting, missing_ok=True)}
    return [
        (path, split, classes[label], patient)
        for split, files in groups.items()
        for path, label, patient in zip(
            files.paths, files.labels, files.patients or [None] * len(files.paths), strict=True
        )
    ]


def scan(data: Path, classes=DEFAULT_CLASSES, setting: str = "DATA") -> list[FileRecord]:
    """Every file inspected, in parallel, in listing order."""
    jobs = dataset_files(data, classes, setting)
    records: list[FileRecord | None] = [None] * len(jobs)

    def one(i: int) -> None:
        records[i] = inspect_file(*jobs[i])

    for _ in bounded_map(one, range(len(jobs)), available_cpus()):
        pass
    return records


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


def _hashes(records: list[FileRecord]) -> tuple[list[Path], np.ndarray]:
    hashed = [r for r in records if r.phash is not None]
    packed = np.frombuffer(b"".join(r.phash for r in hashed), np.uint8).reshape(-1, HASH_BYTES)
    return [r.path for r in hashed], packed


def _relative(path: Path, root: Path) -> str:
    base = root.parent if root.is_file() else root
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def summarise(records: list[FileRecord], data_dir: Path, threshold: int, classes=DEFAULT_CLASSES) -> dict:
    """The report of inspected files: per split and class, bad files, exact and near duplicates."""
    split_of = {r.path: r.split for r in records}

    def rel(path: Path) -> str:
        return _relative(path, data_dir)

    exact = exact_duplicate_groups([r for r in records if not r.error])
    exact_pairs = {frozenset((a, b)) for g in exact for i, a in enumerate(g) for b in g[i + 1 :]}
    paths, hashes = _hashes(records)
    near = [
        p for p in near_pairs(paths, hashes, None, None, threshold) if frozenset((p.train, p.test)) not in exact_pairs
    ]
    near_rows = [
        {
            "a": rel(p.train),
            "b": rel(p.test),
            "distance_bits": p.distance,
            "cross_split": split_of[p.train] != split_of[p.test],
        }
        for p in near
    ]
    exact_rows = [{"files": [rel(p) for p in g], "cross_split": len({split_of[p] for p in g}) > 1} for g in exact]
    splits = [s for s in [*SPLITS, WHOLE] if any(r.split == s for r in records)]
    per_group = {
        split: {c: _group_stats([r for r in records if r.split == split and r.label == c]) for c in classes}
        for split in splits
    }
    exact_cross_pairs = sum(1 for pair in exact_pairs if len({split_of[p] for p in pair}) > 1)
    patients = [{"files": [rel(p) for p in files]} for files in shared_patients(records)]
    return {
        "data_dir": str(data_dir),
        "threshold_bits": threshold,
        "hash": "imagehash.phash, hash_size=16 (256 bits), of the grey image resized to 128x128",
        "files": len(records),
        "per_split_class": per_group,
        "bad_files": [{"path": rel(r.path), "reason": r.error} for r in records if r.error],
        "exact_duplicates": exact_rows,
        "near_duplicates": near_rows,
        "patients_train_test": patients,
        "summary": {
            "bad_files": sum(1 for r in records if r.error),
            "exact_duplicate_groups": len(exact),
            "exact_duplicate_pairs": len(exact_pairs),
            "exact_duplicate_pairs_train_test": exact_cross_pairs,
            "near_duplicate_pairs": len(near_rows),
            "near_duplicate_pairs_train_test": sum(r["cross_split"] for r in near_rows),
            "patients_train_test": len(patients),
        },
    }


def shared_patients(records: list[FileRecord]) -> list[list[Path]]:
    """The files of each patient who has images in both train and test: leakage as a shared image is (the model
    has seen that chest), whatever the pictures. One sorted list of files per patient; the patient is not named."""
    by_patient: dict[str, list[FileRecord]] = defaultdict(list)
    for r in records:
        if r.patient is not None and not r.error:
            by_patient[r.patient].append(r)
    shared = [g for g in by_patient.values() if {r.split for r in g} >= set(SPLITS)]
    return sorted(sorted(r.path for r in g) for g in shared)


def shared_images(
    ours: list[FileRecord], ours_dir: Path, theirs: list[FileRecord], theirs_dir: Path, threshold: int
) -> list[dict]:
    """Images of one dataset that the other has too: identical bytes or near-duplicates.

    Identical bytes decode to the same hash, so the near-duplicate search finds them too (at 0 bits).
    """
    sha = {r.path: r.sha256 for r in (*ours, *theirs)}
    a_paths, a_hashes = _hashes(ours)
    b_paths, b_hashes = _hashes(theirs)
    rows = [
        {
            "ours": _relative(p.train, ours_dir),
            "theirs": _relative(p.test, theirs_dir),
            "distance_bits": p.distance,
            "identical": sha[p.train] == sha[p.test],
        }
        for p in near_pairs(a_paths, a_hashes, b_paths, b_hashes, threshold)
    ]
    return sorted(rows, key=lambda r: (r["distance_bits"], r["ours"], r["theirs"]))


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
    lines += ["", "## Patients in both train and test (DICOM PatientID or a label file's patient column)", ""]
    lines += [
        "- **train/test leakage**: " + ", ".join(f"`{f}`" for f in g["files"]) for g in report["patients_train_test"]
    ] or ["None."]
    lines += ["", "## Near-duplicates (same picture, different bytes)", ""]
    lines += [
        f"- {'**train/test leakage**: ' if r['cross_split'] else ''}`{r['a']}` ~ `{r['b']}` ({r['distance_bits']} bits)"
        for r in report["near_duplicates"]
    ] or ["None."]
    if "against" in report:
        other = report["against"]
        lines += ["", f"## Shared with `{other['data_dir']}` ({len(other['shared'])} pairs)", ""]
        lines += [
            f"- `{r['ours']}` {'=' if r['identical'] else '~'} `{r['theirs']}` ({r['distance_bits']} bits)"
            for r in other["shared"]
        ] or ["None."]
    return "\n".join(lines) + "\n"


def _print_summary(report: dict, seconds: float, out: Path) -> None:
    for w in report["warnings"]:
        print(f"warning: {w}")
    print(f"audited {report['files']} files in {seconds:.1f} s")
    for key, value in report["summary"].items():
        print(f"  {key.replace('_', ' ')}: {value}")
    for r in report["near_duplicates"]:
        if r["cross_split"]:
            print(f"  leak: {r['a']} ~ {r['b']} ({r['distance_bits']} bits)")
    for g in report["exact_duplicates"]:
        if g["cross_split"]:
            print(f"  leak (identical bytes): {' = '.join(g['files'])}")
    for g in report["patients_train_test"]:
        print(f"  leak (same patient): {', '.join(g['files'])}")
    if "against" in report:
        shared = report["against"]["shared"]
        print(f"  shared with {report['against']['data_dir']}: {len(shared)} pair(s)")
        for r in shared:
            print(f"    {r['ours']} {'=' if r['identical'] else '~'} {r['theirs']} ({r['distance_bits']} bits)")
    print(f"report: {out / 'audit.md'} and {out / 'audit.json'}")


def _visible(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except OSError:
        return False


REPORTS = ("audit.json", "audit.md")


def unused(base: Path) -> Path:
    """`base`, or `base_2`, `base_3`... where an audit started the same second has it (created when written, so that
    a refused audit leaves no folder: runtime.folders.new_folder would claim it now, and import Lightning)."""
    return next(candidate for candidate in numbered(base) if not candidate.exists())


def check_out(out: Path) -> None:
    """Refuse an --out that could not take the report now, not after a scan of 100,000 files that would be lost.

    Nothing is created here, so a run refused for its data leaves no empty report folder behind: the nearest part of
    the path that exists must be a folder this process may write in (the rest is created when the report is written).
    """
    existing = out
    try:
        while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as err:  # a folder on the way this user may not enter: the nearest one it can see
        blocked = next((p for p in existing.parents if _visible(p)), existing)
        raise OutputDirError(f"--out={out}: cannot enter {blocked} ({type(err).__name__})") from None
    if not is_dir:
        where = "is" if existing == out else f"is below {existing}, which is"
        raise OutputDirError(f"--out={out} {where} a file, not a folder: pick a folder for the report")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"--out={out}: cannot write in {existing}: pick a folder this user may write in")
    if any((out / name).exists() for name in REPORTS):
        raise OutputDirError(f"--out={out} holds an audit already: pick another folder (each audit keeps its own)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestxray.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data_dir", type=Path, metavar="DATA", help="train/ and test/ class folders, one set of class folders, or a CSV"
    )
    parser.add_argument("--against", type=Path, help="another dataset (same kinds): list the images both have")
    parser.add_argument(
        "--out", type=Path, help="report folder, one that holds no audit (outputs/audit/runs/<date>_<time>)"
    )
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="near-duplicate distance, bits")
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES))
    args = parser.parse_args(argv)
    args.out = args.out or unused(Path("outputs/audit/runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    start = time.perf_counter()
    try:
        check_out(args.out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = scan(args.data_dir, args.classes)
            report = summarise(records, args.data_dir, args.threshold, args.classes)
            if args.against:
                theirs = scan(args.against, args.classes, "--against")
                shared = shared_images(records, args.data_dir, theirs, args.against, args.threshold)
                report["against"] = {"data_dir": str(args.against), "files": len(theirs), "shared": shared}
    except (DataError, OutputDirError) as err:
        print(f"audit: error: {err}", file=sys.stderr)
        return 2
    report["warnings"] = [str(w.message) for w in caught]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / REPORTS[0], json.dumps(report, indent=2))
    atomic_write(args.out / REPORTS[1], to_markdown(report))
    _print_summary(report, time.perf_counter() - start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
