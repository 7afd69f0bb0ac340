"""Build prune-cli's offline task suite (prune_cli/tasksuite/*.jsonl) from held-out text.

    python bench/make_task_suite.py

The source is the *evaluation* part of the bundled text (CPython's pydoc topics, split by
paragraph runs so it shares no paragraph with the calibration part; calibrators/sources.py),
read from the Python that runs this script; the files are shipped, so every machine scores the
same examples. Only prose paragraphs are used (no indented code, no ``>>>`` lines). Two tasks,
in lm-eval-harness's task format (prune_cli/stages/tasks.py writes their YAML):

* ``prune_lastword`` (LAMBADA-style, ``output_type: loglikelihood``): a passage of whole sentences
  (20-90 words) with its last word held back; metrics ``acc`` (the word is the model's greedy
  continuation) and ``perplexity`` of the word.
* ``prune_cloze`` (``output_type: multiple_choice``): the first half of a sentence (12+ words) and
  four endings, the true one and three other sentences' endings drawn with a fixed seed;
  metrics ``acc`` and ``acc_norm``.

These are smoke-level quality signals for the bundled model and CI, not published benchmarks:
their numbers are comparable only with each other (same files, same prune-cli version).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prune_cli.calibrators.sources import DOC_SEPARATOR, bundled_text  # noqa: E402

OUT = ROOT / "prune_cli" / "tasksuite"
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
LASTWORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})([.!?]?)$", re.S)
LIMIT = 400


def prose_paragraphs(text: str) -> list[str]:
    out = []
    for paragraph in text.split(DOC_SEPARATOR):
        for block in re.split(r"\n\s*\n", paragraph):
            lines = block.split("\n")
            if any(l.startswith((" ", "\t")) or ">>>" in l or l.strip().startswith(("*", "-", "=", "+")) for l in lines):
                continue
            flat = " ".join(l.strip() for l in lines).strip()
            if len(flat.split()) >= 12 and flat[-1:] in ".!?":
                out.append(flat)
    return out


def lastword_examples(paragraphs: list[str]) -> list[dict]:
    examples = []
    for paragraph in paragraphs:
        passage = []
        for sentence in SENTENCE.split(paragraph):
            passage.append(sentence)
            words = len(" ".join(passage).split())
            if words > 90:
                passage = [sentence] if len(sentence.split()) <= 90 else []
                continue
            if words >= 20:
                found = LASTWORD.match(" ".join(passage))
                if found:
                    examples.append({"context": found.group(1), "target": found.group(2)})
                passage = []
    return examples[:LIMIT]


def cloze_examples(paragraphs: list[str], seed: int = 0) -> list[dict]:
    halves = []
    for paragraph in paragraphs:
        for sentence in SENTENCE.split(paragraph):
            words = sentence.split()
            if 12 <= len(words) <= 60:
                cut = len(words) // 2
                halves.append((" ".join(words[:cut]), " ".join(words[cut:])))
    rng = random.Random(seed)
    examples = []
    for i, (context, ending) in enumerate(halves[:LIMIT]):
        others = [halves[j][1] for j in rng.sample(range(len(halves)), 8) if j != i and halves[j][1] != ending][:3]
        choices = others + [ending]
        rng.shuffle(choices)
        examples.append({"context": context, "choices": choices, "label": choices.index(ending)})
    return examples


def main() -> None:
    text = bundled_text("evaluation")
    paragraphs = prose_paragraphs(text.text)
    OUT.mkdir(exist_ok=True)
    for name, rows in (("lastword", lastword_examples(paragraphs)), ("cloze", cloze_examples(paragraphs))):
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(rows)} examples from {text.source}")


if __name__ == "__main__":
    main()
