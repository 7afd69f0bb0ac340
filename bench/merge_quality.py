"""Fold re-measured runs of ``bench/quality.py`` (or ``bench/activation_quality.py``) into the
committed result files.

    python bench/merge_quality.py NEW.json [NEW2.json ...] [--docs docs] [--activation]

Every run of a new file (keyed by method and level, or method and target with ``--activation``)
replaces the run with the same key in ``docs/quality.json`` (``docs/activation_quality.json``),
or is added to it: one file per benchmark. The new files must come from the same setup
(windows, seed, evaluation) and the same dense perplexity, or nothing is written. Then regenerate the tables:
``python bench/make_tables.py > docs/quality.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETUP_KEYS = ("samples", "seqlen", "eval_windows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", nargs="+", type=Path)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--activation", action="store_true", help="results of bench/activation_quality.py")
    args = parser.parse_args()
    stem, level = ("activation_quality", "target") if args.activation else ("quality", "level")
    home = args.docs / f"{stem}.json"
    targets = {home: json.loads(home.read_text())} if home.exists() else {}
    owner = {(r["method"], r[level]): path for path, data in targets.items() for r in data["runs"]}
    rerun = home
    changed: set[Path] = set()
    for new_path in args.new:
        new = json.loads(new_path.read_text())
        for run in new["runs"]:
            key = (run["method"], run[level])
            path = owner.get(key, rerun)
            if path not in targets:
                targets[path] = {"dense": new["dense"], "runs": [], "setup": new["setup"]}
            data = targets[path]
            mismatch = [k for k in SETUP_KEYS if data["setup"].get(k) != new["setup"].get(k)]
            if mismatch or abs(data["dense"] - new["dense"]) > 1e-9:
                print(f"{new_path}: setup differs from {path} ({', '.join(mismatch) or 'dense ppl'}); nothing written", file=sys.stderr)
                return 2
            old = next((r for r in data["runs"] if (r["method"], r[level]) == key), None)
            if old is None:
                data["runs"].append(run)
                owner[key] = path
            else:
                data["runs"][data["runs"].index(old)] = run
            print(f"{path}: {key[0]} {key[1]}: {'new' if old is None else format(old['ppl'], '.3f')} -> {run['ppl']:.3f}")
            changed.add(path)
    for path in sorted(changed):
        path.write_text(json.dumps(targets[path], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
