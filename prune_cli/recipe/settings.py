"""Every recipe key in one place: its type, default, allowed values and help.

:data:`SETTINGS` is the single source of truth the rest derives from:

* :func:`defaults` -> ``config.DEFAULTS`` (the nested recipe every run starts from; unknown keys
  of a recipe are refused against it, with "did you mean");
* :func:`check` -> the type, range and allowed-value check of a merged recipe, one
  :class:`~prune_cli.core.errors.RecipeError` naming the key (``device must be one of auto, cpu,
  cuda, got 'gpu'`` with a did-you-mean hint; ``calibration.samples must be an integer >= 1``);
* :func:`cli_help` -> the help of the command-line options that set a key (its text, default
  and choices), so ``--help`` and the recipe never disagree;
* ``RunConfig.to_recipe`` writes exactly these keys (a test compares the two).

Values that need more than a type check (method names from the method registry, N:M patterns,
regular expressions, OWL grids, overrides) are checked where they are built, in
:mod:`prune_cli.recipe.config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prune_cli.calibrators.sampling import BOS_MODES
from prune_cli.core.errors import RecipeError, kind_of
from prune_cli.core.registry import did_you_mean
from prune_cli.model.moe import DEFAULT_FALLBACK, DEFAULT_MIN_TOKENS, FALLBACKS, MoeOptions  # noqa: F401 - the recipe's moe keys

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Setting:
    """One recipe key. ``kind``: ``str``, ``int``, ``number``, ``bool``, ``choice`` (one of
    ``choices``), ``paths`` (file paths), ``names`` (a list of strings), ``mapping``, ``list``,
    ``auto-number`` (``"auto"`` or a number), ``any``. ``optional``: ``null`` is allowed."""

    key: str
    default: Any
    help: str
    kind: str = "any"
    choices: tuple = ()
    minimum: float | None = None
    optional: bool = False

    def describe_default(self) -> str:
        if self.default is None or self.default == [] or self.default == {}:
            return ""
        value = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f" (default {value})"


SETTINGS: tuple[Setting, ...] = (
    Setting("version", 1, "Recipe format version.", "int", minimum=1),
    Setting("name", None, "Free text naming the recipe.", "str", optional=True),
    Setting("description", None, "Free text.", "str", optional=True),
    Setting("method", None, "Method: magnitude, wanda, sparsegpt, dsnot, alps, ria (weights); teal, wina, rsparse (activation sparsity).", "str", optional=True),
    Setting("method_options", {}, "The method's options (strict).", "mapping"),
    Setting("sparsity", None, "Fraction of weights removed, in [0, 1).", "number", optional=True),
    Setting("pattern", "unstructured", "unstructured, or N:M = N KEPT of every M (2:4, 4:8).", "str", optional=True),
    Setting("targets.include", [], "Regexes over Linear names inside the decoder blocks: prune only these.", "list"),
    Setting("targets.exclude", [], "Regexes over Linear names: never prune these.", "list"),
    Setting("layerwise.method", "uniform", "Per-layer sparsity.", "choice", ("uniform", "owl"), optional=True),
    Setting("layerwise.m", "auto", "OWL outlier threshold M (auto: chosen on a validation slice).", "auto-number"),
    Setting("layerwise.lambda", "auto", "OWL spread lambda (auto: chosen on a validation slice).", "auto-number"),
    Setting("layerwise.validation_windows", 4, "OWL validation windows.", "int", minimum=1),
    Setting("overrides", [], "Per-layer sparsities: {blocks, match, sparsity} entries, later ones win.", "list"),
    Setting("activation.method", None, "Activation sparsity method: teal, wina, rsparse.", "str", optional=True),
    Setting("activation.sparsity", None, "Activation sparsity, in [0, 1).", "number", optional=True),
    Setting("activation.allocation", "uniform", "Activation sparsity per layer.", "choice", ("uniform", "greedy")),
    Setting("activation.options", {}, "The activation method's options (strict).", "mapping"),
    Setting("activation.max_tokens", 16384, "Calibration tokens sampled per Linear input.", "int", minimum=16),
    Setting("calibration.samples", 32, "Calibration windows.", "int", minimum=1),
    Setting("calibration.seqlen", 512, "Tokens per calibration window.", "int", minimum=2),
    Setting("calibration.seed", 0, "Seed for drawing calibration windows.", "int", minimum=0),
    Setting("calibration.batch_size", 8, "Calibration windows per batch.", "int", minimum=1),
    Setting("calibration.text", [], "Calibration .txt/.jsonl file(s).", "paths"),
    Setting("calibration.dataset", None, "datasets NAME[:CONFIG] or a local data file/folder.", "str", optional=True),
    Setting("calibration.split", "train", "Dataset split.", "str"),
    Setting("calibration.column", "text", "Text field of .jsonl / dataset.", "str"),
    Setting("calibration.chat_template", False, "Render .jsonl rows with a messages list by the tokenizer's chat template.", "bool"),
    Setting("evaluation.enabled", True, "Evaluate dense and compressed (perplexity, tasks).", "bool"),
    Setting("evaluation.windows", 16, "Evaluation windows.", "int", minimum=1),
    Setting("evaluation.seqlen", 512, "Tokens per evaluation window.", "int", minimum=2),
    Setting("evaluation.batch_size", 4, "Evaluation windows (and task requests) per batch.", "int", minimum=1),
    Setting("evaluation.text", [], "Held-out evaluation text file(s).", "paths"),
    Setting("evaluation.tasks", [], "lm-eval tasks scored dense and compressed (offline: prune_cloze, prune_lastword).", "names"),
    Setting("evaluation.task_limit", None, "Examples per task (null: all).", "int", minimum=1, optional=True),
    Setting("evaluation.num_fewshot", None, "Few-shot examples per task prompt (null: the task's).", "int", minimum=0, optional=True),
    Setting("evaluation.task_include_path", [], "Folders of lm-eval task YAML.", "paths"),
    Setting("device", "auto", "Where blocks are computed.", "choice", ("auto", "cpu", "cuda")),
    Setting("dtype", "auto", "Compute dtype (auto: the checkpoint's; float32 on a CPU without fast bfloat16).", "choice", DTYPE_CHOICES),
    Setting("save_dtype", "auto", "Exported weights (auto: the checkpoint's; a GGUF file: bfloat16).", "choice", DTYPE_CHOICES),
    Setting("backend", "auto", "Kernels for statistics and masks (cupy needs CUDA and the gpu extra).", "choice", ("auto", "torch", "cupy")),
    Setting("bos", "auto", "Start every calibration/evaluation window with the BOS token (auto: when the tokenizer adds one by default).",
            "choice", BOS_MODES),
    Setting("gates.max_ppl_ratio", None, "Quality gate: exit 3 (checkpoint still written) when compressed/dense perplexity exceeds R.",
            "number", optional=True),
    Setting("gates.min_task_score", {}, "Quality gates TASK[:METRIC] -> lowest allowed compressed score (exit 3).", "mapping"),
    Setting("gates.max_task_drop", {}, "Quality gates TASK[:METRIC] -> largest allowed drop below the dense score (exit 3).", "mapping"),
    Setting("moe.min_tokens", DEFAULT_MIN_TOKENS, "Mixture-of-experts: experts routed fewer calibration tokens follow moe.fallback.",
            "int", minimum=0),
    Setting("moe.fallback", DEFAULT_FALLBACK, "How an under-routed expert is calibrated.", "choice", FALLBACKS),
)

_BY_KEY = {s.key: s for s in SETTINGS}


def setting(key: str) -> Setting:
    return _BY_KEY[key]


def choices(key: str) -> tuple:
    return _BY_KEY[key].choices


def defaults() -> dict:
    """The nested default recipe (a fresh copy)."""
    import copy

    out: dict = {}
    for s in SETTINGS:
        *parents, leaf = s.key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(s.default)
    return out


def cli_help(key: str, text: str | None = None) -> str:
    """The help of an option that sets ``key``: ``text`` (default: the setting's help), its
    allowed values and its default."""
    s = _BY_KEY[key]
    body = (text or s.help).rstrip(".")
    if s.kind == "choice" and s.choices and "one of" not in body:
        body += f": {', '.join(s.choices)}"
    return f"{body}{s.describe_default()}."


# YAML 1.1 reads some unquoted words as other types: 2:4 is the integer 124, 1.0 a float, yes a
# boolean, 2024-01-01 a date. Such a value where a name belongs gets this hint.
QUOTE_HINT = 'quote the value in the recipe, e.g. pattern: "2:4" (unquoted, YAML reads 2:4 as the number 124)'


def _get(merged: dict, key: str):
    node = merged
    for part in key.split("."):
        node = node[part]
    return node


def check_value(s: Setting, value: Any) -> None:
    """Raise :class:`RecipeError` naming ``s.key`` unless ``value`` fits the setting."""

    if value is None and s.optional:
        return
    key = s.key
    if s.kind in ("str", "choice"):
        if not isinstance(value, str):
            scalar = not isinstance(value, (list, dict, type(None)))
            raise RecipeError(f"{key} must be a string, got {kind_of(value)}", hint=QUOTE_HINT if scalar else None)
        if s.kind == "choice" and value not in s.choices:
            raise RecipeError(f"{key} must be one of {', '.join(s.choices)}, got {value!r}",
                              hint=did_you_mean(value, list(s.choices)))
    elif s.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or (s.minimum is not None and value < s.minimum):
            raise RecipeError(f"{key} must be an integer >= {s.minimum:g}, got {value!r}")
    elif s.kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # ranges: where it is built
            raise RecipeError(f"{key} must be a number in [0, 1), got {kind_of(value)} ({value!r})"
                              if key.endswith("sparsity") else f"{key} must be a number, got {kind_of(value)} ({value!r})")
    elif s.kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, got {kind_of(value)} ({value!r})")
    elif s.kind == "mapping":
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {kind_of(value)}")


def check(merged: dict) -> None:
    """Check every scalar, choice and mapping setting of a merged recipe (see the module
    docstring); lists, paths and the rest are checked where they are built."""
    for s in SETTINGS:
        if s.kind in ("str", "choice", "int", "number", "bool", "mapping"):
            check_value(s, _get(merged, s.key))
