"""Two robustness benches side by side: python benchmarks/robustness_compare.py A_DIR B_DIR [--names a b].

Reads each run folder's robustness.csv (python -m chestxray.robustness) and prints a Markdown table: per shift and
severity, the accuracy of each and the difference B - A, marked where B is worse by more than one image's worth; then,
where both benches had an out-of-distribution detector, the share of images each flagged.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read(folder: Path) -> dict[tuple[str, int], dict]:
    with open(folder / "robustness.csv", newline="") as fh:
        return {(r["shift"], int(r["severity"])): r for r in csv.DictReader(fh)}


def cell(row: dict, key: str) -> float | None:
    return float(row[key]) if row.get(key) else None


def side_by_side(a: dict, b: dict, names: tuple[str, str], key: str = "accuracy") -> str:
    shifts = list(dict.fromkeys(s for s, _ in a))
    severities = sorted({k for _, k in a})
    head = "| shift | " + " | ".join(f"{k}: {names[0]} / {names[1]} (diff)" for k in severities) + " |"
    lines = [head, "|---|" + "---|" * len(severities)]
    for shift in shifts:
        cells = []
        for k in severities:
            x, y = cell(a[(shift, k)], key), cell(b[(shift, k)], key)
            one = 1 / int(a[(shift, k)]["n"])
            mark = " **worse**" if key == "accuracy" and y < x - one - 1e-6 else ""
            cells.append(f"{x:.3f} / {y:.3f} ({y - x:+.3f}){mark}")
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    args = parser.parse_args()
    a, b = read(args.a), read(args.b)
    print(side_by_side(a, b, tuple(args.names)), end="")
    flags = "share_flagged_ood"
    if all(cell(row, flags) is not None for bench in (a, b) for row in bench.values()):
        print("\nShare flagged out of distribution:\n")
        print(side_by_side(a, b, tuple(args.names), flags), end="")


if __name__ == "__main__":
    main()
