"""Every recipe key in one place: its type, default, allowed values, range and help.

:data:`SETTINGS` is the single source of truth the rest derives from:

* :func:`defaults` -> ``config.DEFAULTS`` (the nested recipe every run starts from; unknown keys
  of a recipe are refused against it, with "did you mean"), and :func:`field_default` -> the
  defaults of the config dataclasses (:mod:`prune_cli.recipe.config`);
* :func:`check` -> the type, range and allowed-value check of a merged recipe, one
  :class:`~prune_cli.core.errors.RecipeError` naming the key (``device must be one of auto, cpu,
  cuda, got 'gpu'`` with a did-you-mean hint; ``calibration.samples must be an integer >= 1``);
* :func:`cli_help` -> the help of the command-line options that set a key (its text, default
  and choices), so ``--help`` and the recipe never disagree;
* ``RunConfig.to_recipe`` writes exactly these keys, in this order;
* :mod:`prune_cli.recipe.schema` -> the JSON Schema of a recipe file
  (``prune_cli/schemas/recipe.v1.schema.json``).

Closed choices (backend names, dtype names, BOS modes, the mixture-of-experts fallbacks) come
from :mod:`prune_cli.core.names`, where they are defined once for the modules that act on them;
it imports nothing, so reading this table imports no torch. Method names are the method registries'
(``registries``): they are checked where the methods are built, in
:mod:`prune_cli.recipe.config`, with the other rules that relate several keys (an N:M pattern
and a sparsity, OWL and a pattern, a gate and the evaluation, ...). The sparsity's range is the
:class:`~prune_cli.core.patterns.Unstructured` pattern's own check (a ``PatternError``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from prune_cli.core.errors import RecipeError, kind_of
from prune_cli.core.names import BACKEND_NAMES, BOS_MODES, DTYPE_NAMES
from prune_cli.core.names import MOE_DEFAULT_FALLBACK as DEFAULT_FALLBACK
from prune_cli.core.names import MOE_DEFAULT_MIN_TOKENS as DEFAULT_MIN_TOKENS
from prune_cli.core.names import MOE_FALLBACKS as FALLBACKS
from prune_cli.core.registry import did_you_mean

DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
WEIGHT_METHODS = "prune_cli.methods:WEIGHT_METHODS"  # the registries a method name is looked up in
ACTIVATION_METHODS = "prune_cli.activation:ACTIVATION_METHODS"

KINDS = ("str", "int", "number", "bool", "choice", "paths", "names", "mapping", "regexes", "overrides",
         "task-limits", "auto-number")


@dataclass(frozen=True)
class Setting:
    """One recipe key. ``kind``: ``str``, ``int``, ``number``, ``bool``, ``choice`` (one of
    ``choices``), ``paths`` (file paths: one or a list), ``names`` (task names: one or a list),
    ``regexes`` (regular expressions: one or a list), ``mapping`` (option name -> value),
    ``task-limits`` (``TASK[:METRIC]`` -> number), ``overrides`` (a list of ``{blocks, match,
    sparsity}``), ``auto-number`` (``"auto"`` or a number). ``minimum`` / ``maximum``: the range of
    a number (``open_minimum`` / ``open_maximum``: the bound itself excluded). ``optional``:
    ``null`` is allowed. ``registries``: ``"module:NAME"`` of the registries that know the names
    the key takes (the JSON Schema lists them)."""

    key: str
    default: Any
    help: str
    kind: str = "str"
    choices: tuple = ()
    minimum: float | None = None
    optional: bool = False
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False
    registries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.key}: unknown kind {self.kind!r}")

    def describe_default(self) -> str:
        if self.default is None or self.default == [] or self.default == {}:
            return ""
        value = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f" (default {value})"

    def range_text(self) -> str:
        """``[0, 1)``, ``[1.0, 1000.0]``, ``(0, inf)``: the range of a number, as messages write it."""
        low = "-inf" if self.minimum is None else self.minimum
        high = "inf" if self.maximum is None else self.maximum
        return f"{'(' if self.open_minimum or self.minimum is None else '['}{low}, {high}" \
               f"{')' if self.open_maximum or self.maximum is None else ']'}"

    def in_range(self, value: Any) -> bool:
        """Whether ``value`` is a finite number (not a boolean) within the setting's range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.minimum is not None and (value <= self.minimum if self.open_minimum else value < self.minimum):
            return False
        return self.maximum is None or (value < self.maximum if self.open_maximum else value <= self.maximum)


SETTINGS: tuple[Setting, ...] = (
    Setting("version", 1, "Recipe format version.", "int", minimum=1),
    Setting("name", None, "Free text naming the recipe.", "str", optional=True),
    Setting("description", None, "Free text.", "str", optional=True),
    Setting("method", None, "Method: magnitude, wanda, sparsegpt, dsnot, alps, ria (weights); teal, wina, rsparse (activation sparsity).",
            "str", optional=True, registries=(WEIGHT_METHODS, ACTIVATION_METHODS)),
    Setting("method_options", {}, "The method's options (strict).", "mapping"),
    Setting("sparsity", None, "Fraction of weights removed, in [0, 1).", "number", minimum=0, maximum=1, open_maximum=True,
            optional=True),
    Setting("pattern", "unstructured", "unstructured, or N:M = N KEPT of every M (2:4, 4:8).", "str", optional=True),
    Setting("activation.method", None, "Activation sparsity method: teal, wina, rsparse.", "str", optional=True,
            registries=(ACTIVATION_METHODS,)),
    Setting("activation.sparsity", None, "Activation sparsity, in [0, 1).", "number", minimum=0, maximum=1, open_maximum=True,
            optional=True),
    Setting("activation.allocation", "uniform", "Activation sparsity per layer.", "choice", ("uniform", "greedy")),
    Setting("activation.options", {}, "The activation method's options (strict).", "mapping"),
    Setting("activation.max_tokens", 16384, "Calibration tokens sampled per Linear input.", "int", minimum=16),
    Setting("targets.include", [], "Regexes over Linear names inside the decoder blocks: prune only these.", "regexes"),
    Setting("targets.exclude", [], "Regexes over Linear names: never prune these.", "regexes"),
    Setting("layerwise.method", "uniform", "Per-layer sparsity.", "choice", ("uniform", "owl"), optional=True),
    Setting("layerwise.m", "auto", "OWL outlier threshold M (auto: chosen on a validation slice).", "auto-number",
            minimum=1.0, maximum=1000.0, optional=True),
    Setting("layerwise.lambda", "auto", "OWL spread lambda (auto: chosen on a validation slice).", "auto-number",
            minimum=0.0, maximum=0.5, optional=True),
    Setting("layerwise.validation_windows", 4, "OWL validation windows.", "int", minimum=1),
    Setting("overrides", [], "Per-layer sparsities: {blocks, match, sparsity} entries, later ones win.", "overrides"),
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
    Setting("backend", "auto", "Kernels for statistics and masks (cupy needs CUDA and the gpu extra).", "choice", BACKEND_NAMES),
    Setting("bos", "auto", "Start every calibration/evaluation window with the BOS token (auto: when the tokenizer adds one by default).",
            "choice", BOS_MODES),
    Setting("gates.max_ppl_ratio", None, "Quality gate: exit 3 (checkpoint still written) when compressed/dense perplexity exceeds R.",
            "number", minimum=0, open_minimum=True, optional=True),
    Setting("gates.min_task_score", {}, "Quality gates TASK[:METRIC] -> lowest allowed compressed score (exit 3).", "task-limits"),
    Setting("gates.max_task_drop", {}, "Quality gates TASK[:METRIC] -> largest allowed drop below the dense score (exit 3).", "task-limits",
            minimum=0.0),
    Setting("moe.min_tokens", DEFAULT_MIN_TOKENS, "Mixture-of-experts: experts routed fewer calibration tokens follow moe.fallback.",
            "int", minimum=0),
    Setting("moe.fallback", DEFAULT_FALLBACK, "How an under-routed expert is calibrated.", "choice", FALLBACKS),
)

_BY_KEY = {s.key: s for s in SETTINGS}


def setting(key: str) -> Setting:
    return _BY_KEY[key]


def choices(key: str) -> tuple:
    return _BY_KEY[key].choices


def nest(flat: dict[str, Any]) -> dict:
    """``{"a.b": 1, "c": 2}`` -> ``{"a": {"b": 1}, "c": 2}``, in the order of ``flat``."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def defaults() -> dict:
    """The nested default recipe (a fresh copy)."""
    return nest({s.key: copy.deepcopy(s.default) for s in SETTINGS})


def field_default(key: str) -> Any:
    """The default of a config dataclass field that holds ``key``: a list default as a tuple
    (the configs are frozen), a mapping through a factory (a fresh one per instance)."""
    value = _BY_KEY[key].default
    if isinstance(value, dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value))
    return tuple(value) if isinstance(value, list) else value


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
            where = f" in {s.range_text()}" if s.maximum is not None else ""
            raise RecipeError(f"{key} must be a number{where}, got {kind_of(value)} ({value!r})")
    elif s.kind == "auto-number":
        if value != "auto" and not s.in_range(value):
            raise RecipeError(f"{key} must be 'auto' or a number in {s.range_text()}, got {value!r}")
    elif s.kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, got {kind_of(value)} ({value!r})")
    elif s.kind in ("mapping", "task-limits"):
        if not isinstance(value, dict):
            raise RecipeError(f"{key} must be a mapping, got {kind_of(value)}")


CHECKED_HERE = ("str", "choice", "int", "number", "auto-number", "bool", "mapping", "task-limits")


def check(merged: dict) -> None:
    """Check every scalar, choice and mapping setting of a merged recipe (see the module
    docstring). Lists (paths, names, regexes, overrides) are checked item by item where they are
    built, in :mod:`prune_cli.recipe.config`, and so are the ranges that depend on other keys
    (the sparsities: see :func:`Setting.in_range`)."""
    for s in SETTINGS:
        if s.kind in CHECKED_HERE:
            check_value(s, _get(merged, s.key))
