"""Print the parity reports under a folder as one table a newcomer can read.

    python scripts/parity_table.py demo/ [--seconds N]

One row per report (``*/parity.json``, ``*/parity-EMULATOR.json``): the build,
where it ran (host or emulator), the verdict, the worst error against its
criterion, and the time the check took.  Exit 1 when any report failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*/parity*.json")):
        report = json.loads(path.read_text())
        build = path.parent.name
        if "emulator" not in report:  # host parity against transformers
            s = report["summary"]
            out.append(
                {
                    "build": build,
                    "where": "host",
                    "check": "whole model vs transformers",
                    "pass": report["pass"],
                    "error": f"{s['max_rel']:.2e} (<= {report['tolerance']['max_rel']:g})",
                    "seconds": s["seconds"],
                }
            )
            continue
        where = f"emulator {report['emulator']}"
        if "model" in report:
            m = report["model"]
            out.append(
                {
                    "build": build,
                    "where": where,
                    "check": "whole model vs transformers",
                    "pass": m["pass"],
                    "error": f"{m['summary']['max_rel']:.2e} (<= {m['tolerance']['max_rel']:g})",
                    "seconds": m.get("seconds", ""),
                }
            )
        if "kernels" in report:
            k = report["kernels"]["summary"]
            out.append(
                {
                    "build": build,
                    "where": where,
                    "check": f"kernel replay ({k['replayed']} calls, {k['kernels']} kernels)",
                    "pass": k["pass"],
                    "error": f"{k['max_rel']:.2e} (<= {k['tolerance']:g})",
                    "seconds": report["kernels"].get("seconds", ""),
                }
            )
        if "syntax" in report:
            syn = report["syntax"]
            out.append(
                {
                    "build": build,
                    "where": where,
                    "check": "syntax check only (not parity)",
                    "pass": syn["pass"],
                    "error": "-",
                    "seconds": report.get("seconds", ""),
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seconds", type=int, help="total wall time to print under the table")
    args = ap.parse_args(argv)
    table = rows(args.folder)
    if not table:
        print(f"{args.folder}: no parity reports", file=sys.stderr)
        return 1
    header = ("build", "host / emulator", "check", "verdict", "max rel error (limit)", "s")
    lines = [header] + [
        (
            r["build"],
            r["where"],
            r["check"],
            "PASS" if r["pass"] else "FAIL",
            r["error"],
            str(r["seconds"]),
        )
        for r in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    failed = sum(not r["pass"] for r in table)
    total = (
        f" in {args.seconds // 60} min {args.seconds % 60} s" if args.seconds is not None else ""
    )
    print(
        f"\n{len(table) - failed} passed, {failed} failed{total}; reports: {args.folder}/*/parity*.json (+ .png)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
