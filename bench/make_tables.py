"""Render the JSON results of bench/quality.py and bench/activation_quality.py as markdown.

    python bench/make_tables.py > docs/quality.md

Reads docs/quality.json (weight methods), docs/activation_quality.json and
docs/second_model.json (one file per
benchmark; bench/merge_quality.py folds re-measured runs into them). Nothing here is typed by hand: every number comes from a run.
"""

from __future__ import annotations

import json
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
LEVELS = ["50%", "60%", "70%", "2:4"]


def weight_table() -> str:
    runs: dict[tuple[str, str], dict] = {}
    dense = None
    setup = None
    for path in [DOCS / "quality.json"]:
        data = json.loads(path.read_text())
        dense, setup = data["dense"], data["setup"]
        for r in data["runs"]:
            runs.setdefault((r["method"], r["level"]), r)
    if not runs:
        return ""
    names = list(dict.fromkeys(m for m, _ in runs))
    lines = [
        f"Held-out perplexity, bundled SmolLM2-135M, fp32 CPU; calibration {setup['samples']} x {setup['seqlen']} tokens "
        f"(seed 0), evaluation {setup['eval_windows']} x {setup['seqlen']} tokens (disjoint text). Dense: **{dense:.2f}**.",
        "",
        "| method | " + " | ".join(LEVELS) + " |",
        "|---|" + "---|" * len(LEVELS),
    ]
    for name in names:
        cells = []
        for level in LEVELS:
            r = runs.get((name, level))
            cell = "" if r is None else f"{r['ppl']:.2f}"
            if r is not None and "owl" in r:
                cell += f" (M={r['owl']['m']:g}, λ={r['owl']['lambda']:g})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def activation_table() -> str:
    paths = [p for p in [DOCS / "activation_quality.json"] if p.exists()]
    if not paths:
        return ""
    data = {"runs": []}
    seen = set()
    for path in paths:
        part = json.loads(path.read_text())
        data["dense"] = part["dense"]
        for r in part["runs"]:
            if (r["method"], r["target"]) not in seen:
                seen.add((r["method"], r["target"]))
                data["runs"].append(r)
    levels = sorted({r["target"] for r in data["runs"]})
    lines = [
        f"Held-out perplexity with every token sparsified; in brackets the achieved sparsity measured on the held-out "
        f"tokens (parameter-weighted skipped work; R-Sparse counts its low-rank work). Dense: **{data['dense']:.2f}**.",
        "",
        "| method | " + " | ".join(f"{l:.0%}" for l in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for name in dict.fromkeys(r["method"] for r in data["runs"]):
        cells = []
        for level in levels:
            hit = [r for r in data["runs"] if r["method"] == name and r["target"] == level]
            cells.append(f"{hit[0]['ppl']:.2f} ({hit[0]['achieved']:.1%})" if hit else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MODEL_NAMES = {"smollm2": "SmolLM2-135M (bundled; Llama, no BOS)", "gemma3": "Gemma 3 270M (sliding + global attention, BOS)"}


def _mean_spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """Mean ± sample standard deviation over the seeds."""
    import statistics

    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def second_model_tables() -> str:
    path = DOCS / "second_model.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    setup = data["setup"]
    w = dict(zip(setup["windows"][::2], setup["windows"][1::2]))
    lines = [
        f"Held-out perplexity per model, each run one `prune-cli compress` process on the CPU: calibration "
        f"{w['--calib-samples']} x {w['--seqlen']} tokens, evaluation {w['--eval-windows']} x {w['--eval-seqlen']} tokens "
        f"(disjoint text); mean ± standard deviation over the calibration seeds {', '.join(map(str, setup['seeds']))} "
        "(the evaluation windows are the same for every seed). Windows follow the tokenizer's BOS convention "
        "(`--bos auto`); \"no BOS\" is the same run (seed 0) with `--bos never`.",
    ]
    ranks, stats = {}, {}
    for model in ("smollm2", "gemma3"):
        rows = data.get(model)
        if not rows:
            continue
        first = next(iter(next(iter(rows.values())).values()))
        lines += ["", f"### {MODEL_NAMES[model]}", ""]
        nobos = any("no bos, seed 0" in r for r in rows.values())
        dense_nobos = next((r["no bos, seed 0"]["dense"] for r in rows.values() if "no bos, seed 0" in r), None)
        lines.append(f"Dense: **{first['dense']:.2f}**" + (f" (no BOS: {dense_nobos:.2f})." if dense_nobos else "."))
        lines += ["", "| method | perplexity | sparsity |" + (" no BOS (seed 0) |" if nobos else ""),
                  "|---|---|---|" + ("---|" if nobos else "")]
        means = {}
        for method, runs in rows.items():
            seeded = [r for k, r in runs.items() if k.startswith("seed")]
            values = [r["compressed"] for r in seeded]
            means[method] = sum(values) / len(values)
            import statistics

            stats.setdefault(model, {})[method] = (means[method], statistics.stdev(values) if len(values) > 1 else 0.0)
            cell = f"| {method} | {_mean_spread(values)} | {seeded[0]['sparsity']:.3f} |"
            if nobos:
                cell += f" {runs['no bos, seed 0']['compressed']:.2f} |" if "no bos, seed 0" in runs else " |"
            lines.append(cell)
        ranks[model] = sorted(means, key=means.get)
    if len(ranks) == 2:
        lines += ["", "Ranking by mean perplexity (best first):", ""]
        for model, order in ranks.items():
            lines.append(f"- {MODEL_NAMES[model]}: " + " < ".join(order))
        lines += ["", "Where the two models rank a pair of methods the other way round (a gap larger than the two "
                  "standard deviations together is marked *clear*, otherwise *within the spread*):", ""]
        (a_model, a_stats), (b_model, b_stats) = list(stats.items())
        for i, x in enumerate(ranks[a_model]):
            for y in ranks[a_model][i + 1:]:
                if x in b_stats and y in b_stats and b_stats[y][0] < b_stats[x][0]:
                    def clear(st):
                        return abs(st[x][0] - st[y][0]) > st[x][1] + st[y][1]
                    how = "clear" if clear(a_stats) and clear(b_stats) else "within the spread"
                    lines.append(f"- {x} vs {y}: {MODEL_NAMES[a_model].split(' ')[0]} {a_stats[x][0]:.2f} < "
                                 f"{a_stats[y][0]:.2f}, {MODEL_NAMES[b_model].split(' ')[0]} {b_stats[x][0]:.2f} > "
                                 f"{b_stats[y][0]:.2f} ({how})")
    return "\n".join(lines)


def task_table() -> str:
    """docs/task_scores.json (bench/task_scores.py): dense and compressed offline-suite scores."""
    path = DOCS / "task_scores.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    seeds = data["setup"]["seeds"]
    first = next(iter(next(iter(data["runs"].values())).values()))
    dense = first["dense"]
    lines = [f"{data['setup']['model']}; the offline suite (prune_cloze: {first['dense']['prune_cloze']['samples']} four-way "
             f"cloze items, chance 0.25; prune_lastword: {first['dense']['prune_lastword']['samples']} held-back last words), "
             f"calibration 16 x 256 tokens, mean ± standard deviation over seeds {', '.join(map(str, seeds))}; "
             "lm-eval's stderr of one run in the dense row. Not a published benchmark: comparable only with itself.", "",
             "| model | cloze acc | cloze acc_norm | last-word acc | last-word ppl | held-out ppl |", "|---|---|---|---|---|---|"]
    m = {t: dense[t]["metrics"] for t in dense}
    lines.append(f"| dense | {m['prune_cloze']['acc']:.3f} ± {m['prune_cloze']['acc_stderr']:.3f} | "
                 f"{m['prune_cloze']['acc_norm']:.3f} ± {m['prune_cloze']['acc_norm_stderr']:.3f} | "
                 f"{m['prune_lastword']['acc']:.3f} ± {m['prune_lastword']['acc_stderr']:.3f} | "
                 f"{m['prune_lastword']['perplexity']:.1f} | {first['ppl']['dense']:.2f} |")
    for method, runs in data["runs"].items():
        rs = list(runs.values())

        def cell(task, metric, fmt="{:.3f}"):
            return _mean_spread([r["compressed"][task]["metrics"][metric] for r in rs], fmt)

        lines.append(f"| {method} | {cell('prune_cloze', 'acc')} | {cell('prune_cloze', 'acc_norm')} | "
                     f"{cell('prune_lastword', 'acc')} | {cell('prune_lastword', 'perplexity', '{:.1f}')} | "
                     f"{_mean_spread([r['ppl']['compressed'] for r in rs])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("# Quality (generated by bench/make_tables.py from bench/*.py results)\n")
    print("## Weight pruning (bench/quality.py)\n")
    print(weight_table())
    print("\n## Activation sparsity (bench/activation_quality.py)\n")
    print(activation_table())
    second = second_model_tables()
    if second:
        print("\n## Two models (bench/second_model.py)\n")
        print(second)
    tasks = task_table()
    if tasks:
        print("\n## Offline task suite (bench/task_scores.py)\n")
        print(tasks)
