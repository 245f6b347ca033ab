"""Paired comparison of variants taken from several ``reproduction.py`` results files.

``reproduction.py`` compares the variants of one call; a later study of the same setting (another schedule,
another target knob) lands in a results file of its own and may reuse a variant name with other overrides
(``layerlock`` with ``--set schedule.kind=adaptive``). This script puts such runs side by side under names
of your choosing, paired per seed against one of them, with the same statistics as ``reproduction.py``:

    python benchmarks/compare_runs.py --reference mae \\
        --runs mae=benchmarks/results/reproduction-evidence.json:mae \\
        --runs layerlock=benchmarks/results/reproduction-evidence.json:layerlock \\
        --runs layerlock-adaptive=benchmarks/results/reproduction-evidence-adaptive.json:layerlock \\
        --out benchmarks/results/compare-evidence-adaptive

Every file must hold runs of the same config file name and step budget (else the comparison is refused).
A name may be given for several files (one per seed, say, each replaying that seed's schedule), each seed
once.
Writes ``OUT.json`` (the rows compared, differences, each file's provenance) and ``OUT.md`` (means, paired
differences, each run's freeze events).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    aggregate_seeds, paired_markdown, paired_table, provenance, seeds_markdown, write_json)
from reproduction import METRICS  # noqa: E402


def parse_spec(spec: str) -> tuple[str, Path, str]:
    """``NAME=FILE:VARIANT`` -> (name, file, variant)."""
    name, sep, rest = spec.partition("=")
    path, sep2, variant = rest.rpartition(":")
    if not (sep and sep2 and name and path and variant):
        raise ValueError(f"--runs: {spec!r} is not NAME=FILE:VARIANT")
    return name, Path(path), variant


def load_rows(specs: list[str]) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """The runs each spec names, relabelled ``name``; refuses files of another setting than the first's."""
    rows, names, sources, setting = [], [], {}, None
    for spec in specs:
        name, path, variant = parse_spec(spec)
        data = json.loads(path.read_text())
        mine = [{**r, "name": name} for r in data["runs"] if r["variant"] == variant]
        if not mine:
            raise ValueError(f"--runs: {path} holds no runs of {variant!r} (it has {', '.join(data['methods'])})")
        # one name may gather several files (e.g. one per seed, each with its own replayed schedule)
        taken = {r["seed"] for r in rows if r["name"] == name} & {r["seed"] for r in mine}
        if taken:
            raise ValueError(f"--runs: {name!r} already has seed(s) {sorted(taken)}; a name takes each seed once")
        this = (Path(str(data.get("config_file"))).name, data["steps"])
        if setting is None:
            setting = this
        elif this != setting:
            raise ValueError(f"--runs: {path} is another setting (config {this[0]}, {this[1]} steps) than "
                             f"the first file's (config {setting[0]}, {setting[1]} steps)")
        rows += mine
        if name not in names:
            names.append(name)
        sources.setdefault(name, []).append({"file": str(path), "variant": variant,
                                             "seeds": sorted(r["seed"] for r in mine),
                                             "extra_overrides": data.get("extra_overrides"),
                                             "provenance": data.get("provenance")})
    return rows, names, {"config": setting[0], "steps": setting[1], "sources": sources}


def markdown(rows, names, reference, table, diffs, setting, meta) -> str:
    """Where each name's runs come from, their means (:func:`seeds_markdown`), the paired differences
    against ``reference`` and each run's freeze events."""
    metrics = [(k, h) for k, h, _ in METRICS if all(k in r["probes"] for r in rows)]
    lines = [f"Runs of `{setting['config']}`, {setting['steps']} steps, from several results files "
             "(`benchmarks/compare_runs.py`):", "",
             "| name | file : variant (seeds) | extra overrides |", "|---|---|---|"]
    for name in names:
        for s in setting["sources"][name]:
            lines.append(f"| {name} | `{s['file']}` : {s['variant']} ({', '.join(map(str, s['seeds']))}) | "
                         f"{' '.join(s['extra_overrides'] or []) or '–'} |")
    note = ("Where and when each run ran: the provenance in its results file; the machine and date that follow "
            "are where the comparison was made.")
    lines += ["", seeds_markdown(table, metrics, setting["steps"], meta, note=note)]
    lines.append(paired_markdown(diffs, reference, metrics))
    lines += ["Freeze events per run (step, blocks frozen after it):", ""]
    for r in sorted(rows, key=lambda r: (names.index(r["name"]), r["seed"])):
        events = ", ".join(f"{s} ({n})" for s, n in r.get("events", [])) or "none"
        lines.append(f"- {r['name']} seed {r['seed']}: {events}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", action="append", required=True, metavar="NAME=FILE:VARIANT",
                   help="the runs of VARIANT in results file FILE, shown as NAME (repeat for each)")
    p.add_argument("--reference", required=True, help="the NAME every other is compared with per seed")
    p.add_argument("--out", type=Path, required=True, help="output path without suffix (.json and .md written)")
    args = p.parse_args(argv)
    try:
        rows, names, setting = load_rows(args.runs)
        if args.reference not in names:
            raise ValueError(f"--reference: {args.reference!r} is none of the names given ({', '.join(names)})")
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    keys = [k for k, _, _ in METRICS if all(k in r["probes"] for r in rows)]
    table = aggregate_seeds(rows, names, "name", keys, [])
    diffs = paired_table(rows, names, args.reference, "name", keys)
    meta = provenance(["benchmarks/compare_runs.py", *(sys.argv[1:] if argv is None else argv)])
    runs = [{k: v for k, v in r.items() if k != "collapse_over_time"} for r in rows]
    write_json(args.out.with_suffix(".json"), {"provenance": meta, "setting": setting, "reference": args.reference,
                                               "table": table, "differences": diffs, "runs": runs})
    md = markdown(rows, names, args.reference, table, diffs, setting, meta)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
