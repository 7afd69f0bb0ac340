"""The run configuration: recipe YAML (strict, versioned) < command-line flags, validated once.

A recipe (version 1)::

    version: 1
    name: wanda-50                 # optional, free text
    description: ...               # optional, free text
    method: wanda                  # a registered weight method
    method_options: {}             # that method's options (strict)
    sparsity: 0.5                  # fraction removed (implied by an N:M pattern)
    pattern: unstructured          # or "2:4" = 2 KEPT of every 4
    targets: {include: [], exclude: []}   # regexes over Linear names inside decoder blocks
    layerwise: {method: uniform}   # or {method: owl, m: auto|5, lambda: auto|0.08, validation_windows: 4}
    activation: {method: wina, sparsity: 0.4, allocation: uniform|greedy, options: {}}
                                   # activation sparsity (after any weight method); with
                                   # `method: teal|wina|rsparse` at the top, --sparsity is the
                                   # activation sparsity and no weight method runs
    overrides:                     # later entries win; after OWL
      - {blocks: [0, 1], sparsity: 0.3}
      - {match: "mlp\\.down_proj", sparsity: 0.4}
    calibration: {samples: 32, seqlen: 512, seed: 0, batch_size: 8,
                  text: [files], dataset: NAME[:CONFIG], split: train, column: text}
    evaluation: {enabled: true, windows: 16, seqlen: 512, batch_size: 4, text: [files],
                 tasks: [prune_cloze], task_limit: null, num_fewshot: null, task_include_path: []}
                                   # lm-eval tasks scored dense and compressed (prune_cli.stages.tasks)
    gates: {max_ppl_ratio: 1.5, min_task_score: {prune_cloze: 0.4}, max_task_drop: {prune_cloze: 0.05}}
                                   # exit 3 when one fails (prune_cli.core.gates)
    device: auto                   # auto | cpu | cuda
    backend: auto                  # auto | torch | cupy (kernels for statistics and masks)
    dtype: auto                    # compute dtype: auto | float32 | bfloat16 | float16 (auto: the
                                   # checkpoint's; float32 on a CPU without fast bfloat16/float16)
    save_dtype: auto               # dtype of the exported weights: auto (the checkpoint's; a GGUF
                                   # source: bfloat16) | float32 | bfloat16 | float16
    bos: auto                      # every calibration/evaluation window starts with the BOS token:
                                   # auto (when the tokenizer adds one by default) | always | never
    moe: {min_tokens: 128, fallback: all-tokens}
                                   # mixture-of-experts: an expert routed fewer calibration tokens
                                   # is calibrated on all tokens (or: magnitude); see prune_cli.model.moe

Unknown keys anywhere are errors with "did you mean"; so is a key given twice in one mapping, and
a value of the wrong type (``method: [wanda]``) is a one-line RecipeError naming its key.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prune_cli.activation import ACTIVATION_METHODS, build_activation_method
from prune_cli.core.errors import RecipeError
from prune_cli.core.gates import Gates
from prune_cli.core.patterns import SparsityPattern, Unstructured, parse_pattern, pattern_to_text
from prune_cli.core.registry import did_you_mean
from prune_cli.methods import WEIGHT_METHODS
from prune_cli.model.moe import MoeOptions
from prune_cli.recipe import llmcompressor as llmcompressor_recipe
from prune_cli.recipe import settings
from prune_cli.recipe.tasks import TaskSettings
from prune_cli.recipe.values import (
    auto_number,
    file_paths,
    linear_regexes,
    string_value,
    task_limits,
    task_names,
)
from prune_cli.recipe.yaml_text import DuplicateKeyError, RecipeLoader, recipe_text

RECIPE_VERSION = 1

DEFAULTS: dict[str, Any] = settings.defaults()  # every key's type, default and help: prune_cli/recipe/settings.py
_default = settings.field_default  # a dataclass field's default, from the same table

DEFAULT_M_GRID = (3.0, 5.0, 7.0, 10.0)
DEFAULT_LAMBDA_GRID = (0.0, 0.04, 0.08, 0.12, 0.16)


@dataclass(frozen=True)
class OwlSettings:
    m: float | None = None  # None = choose on the validation slice
    lam: float | None = None
    m_grid: tuple[float, ...] = DEFAULT_M_GRID
    lambda_grid: tuple[float, ...] = DEFAULT_LAMBDA_GRID
    validation_windows: int = _default("layerwise.validation_windows")


@dataclass(frozen=True)
class Override:
    """A sparsity for the targeted Linears matching ``blocks`` and/or ``match`` (a regex)."""

    sparsity: float
    blocks: tuple[int, ...] = ()
    match: str | None = None

    def applies(self, block: int, name: str) -> bool:
        if self.blocks and block not in self.blocks:
            return False
        return self.match is None or re.search(self.match, name) is not None


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = _default("calibration.samples")
    seqlen: int = _default("calibration.seqlen")
    seed: int = _default("calibration.seed")
    batch_size: int = _default("calibration.batch_size")
    text: tuple[Path, ...] = _default("calibration.text")
    dataset: str | None = _default("calibration.dataset")
    split: str = _default("calibration.split")
    column: str = _default("calibration.column")
    chat_template: bool = _default("calibration.chat_template")  # render .jsonl rows with `messages` by the chat template


@dataclass(frozen=True)
class EvaluationConfig:
    enabled: bool = _default("evaluation.enabled")
    windows: int = _default("evaluation.windows")
    seqlen: int = _default("evaluation.seqlen")
    batch_size: int = _default("evaluation.batch_size")
    text: tuple[Path, ...] = _default("evaluation.text")
    tasks: tuple[str, ...] = _default("evaluation.tasks")  # lm-eval task names (prune_cli.stages.tasks)
    task_limit: int | None = _default("evaluation.task_limit")  # examples per task (None: all)
    num_fewshot: int | None = _default("evaluation.num_fewshot")  # None: each task's default
    task_include_path: tuple[Path, ...] = _default("evaluation.task_include_path")  # folders of task YAML

    def task_settings(self):
        """The tasks to score (:class:`~prune_cli.stages.tasks.TaskSettings`), or ``None``."""
        if not self.tasks:
            return None

        return TaskSettings(self.tasks, self.task_limit, self.num_fewshot, self.task_include_path, self.batch_size)


@dataclass(frozen=True)
class Targets:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        """``name`` is the Linear's full module name, e.g. ``model.layers.3.mlp.up_proj``."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    def check_selections(self, names: list[str]) -> None:
        """Every pattern must select: each ``include`` pattern must match one of ``names`` (the
        Linears inside the decoder blocks), and each ``exclude`` pattern one of the Linears the
        includes select. A pattern that matches nothing (a typo, another model's names) would
        otherwise be ignored without a word: an exclude would prune what it meant to keep."""
        for i, pattern in enumerate(self.include):
            if not any(re.search(pattern, n) for n in names):
                raise RecipeError(f"targets.include[{i}] {pattern!r} matches no Linear module in the decoder blocks",
                                  hint=_names_hint(names))
        included = [n for n in names if not self.include or any(re.search(p, n) for p in self.include)]
        for i, pattern in enumerate(self.exclude):
            if not any(re.search(pattern, n) for n in included):
                where = "no Linear module in the decoder blocks" if not any(re.search(pattern, n) for n in names) \
                    else "none of the Linear modules targets.include selects"
                raise RecipeError(f"targets.exclude[{i}] {pattern!r} excludes nothing: it matches {where}",
                                  hint=_names_hint(names))


def _names_hint(names: list[str]) -> str:
    """A hint with one full name and the Linear names inside a block (what the patterns are
    searched in)."""
    if not names:
        return "the model has no Linear module in its decoder blocks"
    local = dict.fromkeys(re.sub(r"^.*?\.\d+\.", "", n) for n in names)
    shown = ", ".join(list(local)[:12]) + (", ..." if len(local) > 12 else "")
    return f"patterns are regular expressions searched in full names such as {names[0]!r}; a block's Linears: {shown}"


@dataclass(frozen=True)
class ActivationConfig:
    method: str
    sparsity: float
    options: dict = _default("activation.options")
    allocation: str = _default("activation.allocation")  # uniform | greedy
    max_tokens: int = _default("activation.max_tokens")  # calibration tokens sampled per Linear input

    def to_dict(self) -> dict:
        return {key.split(".")[1]: value for key, value in _recipe_values(self, "activation.").items()}


@dataclass(frozen=True)
class RunConfig:
    method: str | None  # the weight method; None = activation sparsity only
    pattern: SparsityPattern | None
    method_options: dict = _default("method_options")
    targets: Targets = Targets()
    owl: OwlSettings | None = None  # None = uniform per-layer sparsity
    overrides: tuple[Override, ...] = ()
    activation: ActivationConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    device: str = _default("device")
    dtype: str = _default("dtype")  # compute dtype (see prune_cli.streaming.loader)
    save_dtype: str = _default("save_dtype")  # exported weights
    backend: str = _default("backend")  # auto | torch | cupy
    bos: str = _default("bos")  # auto | always | never (see calibrators.sampling.resolve_bos)
    gates: Gates = Gates()  # quality gates checked after the evaluation (prune_cli.core.gates)
    moe: MoeOptions = MoeOptions()  # experts with too few routed calibration tokens (prune_cli.model.moe)
    name: str | None = _default("name")
    description: str | None = _default("description")

    def to_recipe(self) -> dict:
        """The resolved recipe, as YAML/JSON-ready data (for sparsity.json): every key of
        :data:`~prune_cli.recipe.settings.SETTINGS`, in its order (``activation: null`` without
        activation sparsity; ``layerwise`` holds only its method when uniform; the overrides
        only the keys they set). ``resolve(config.to_recipe(), None) == config``."""
        recipe = settings.nest(_recipe_values(self))
        if self.activation is None:
            recipe["activation"] = None
        if self.owl is None:
            recipe["layerwise"] = {"method": "uniform"}
        return recipe


def _recipe_values(config, prefix: str = "") -> dict[str, Any]:
    """``{key: value}`` of the settings under ``prefix``, as a recipe writes them, read from
    ``config`` (a :class:`RunConfig`, or an :class:`ActivationConfig` for ``activation.``)."""
    out = {}
    for s in settings.SETTINGS:
        if s.key.startswith(prefix):
            out[s.key] = _recipe_value(config, s, s.key[len(prefix):])
    return out


def _recipe_value(config, s: settings.Setting, path: str) -> Any:
    """One setting's recorded value: the dataclass attribute at ``path`` (lists as lists, paths as
    strings), except for the keys a config holds in another shape (the pattern, OWL, overrides)."""
    if path == "version":
        return RECIPE_VERSION
    if path in ("sparsity", "pattern") and isinstance(config, RunConfig):
        if config.pattern is None:
            return None
        return config.pattern.target_sparsity if path == "sparsity" else pattern_to_text(config.pattern)
    if path.startswith("layerwise."):
        owl, leaf = config.owl, path.split(".")[1]
        if leaf == "method":
            return "uniform" if owl is None else "owl"
        value = None if owl is None else getattr(owl, {"lambda": "lam"}.get(leaf, leaf))
        return "auto" if value is None and leaf in ("m", "lambda") else value
    if path == "overrides":
        return [{k: v for k, v in (("blocks", list(o.blocks)), ("match", o.match), ("sparsity", o.sparsity)) if v not in (None, [])}
                for o in config.overrides]
    value = config
    for part in path.split("."):
        value = None if value is None else getattr(value, part)
    if s.kind == "paths":
        return [str(p) for p in value]
    if isinstance(value, tuple):
        return list(value)
    return dict(value) if isinstance(value, dict) else value


_kind = settings.kind_of  # how a wrongly typed value is named in an error: "a list", "null"
_QUOTE_HINT = settings.QUOTE_HINT


def _check_types(merged: dict) -> None:
    """Check the type (and allowed values) of every scalar setting of the merged recipe before
    any is used (:func:`prune_cli.recipe.settings.check`), so that a wrongly typed YAML value
    (``method: [wanda]``, ``device: {cpu: 1}``, ``pattern: 2:4`` read as an integer) is a
    one-line :class:`RecipeError` naming its key instead of a TypeError deep inside the lookups
    below. Ranges are checked where each value is consumed."""
    settings.check(merged)


def _options(value: Any, key: str) -> dict:
    """A method's options: a mapping whose keys are option names (strings)."""
    if not isinstance(value, dict):
        raise RecipeError(f"{key} must be a mapping, got {_kind(value)}")
    for name in value:
        if not isinstance(name, str):
            raise RecipeError(f"{key}: option names must be strings, got {_kind(name)} {name!r}")
    return value


def _build_method(build, name: str, options: dict, key: str):
    """``build(name, options)`` (a weight or activation method), with option VALUES of the wrong
    type (``percdamp: "x"``, ``alpha_grid: 5``) reported as a :class:`RecipeError`: the methods'
    own checks compare or convert them and would raise TypeError / ValueError."""
    try:
        return build(name, options)
    except (TypeError, ValueError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"bad {key} for method {name}: {detail}",
                          hint="check the types of the option values") from None


def _check_keys(data: dict, allowed: dict, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"unknown key {where}{key!r}", hint=did_you_mean(str(key), list(allowed)))


_MAPPINGS = {s.key for s in settings.SETTINGS if s.kind in ("mapping", "task-limits")}  # merged key by key
_NULLABLE_SECTIONS = ("activation",)  # `activation: null`: none (how to_recipe writes it)


def _merge(base: dict, override: dict, where: str = "") -> dict:
    """Deep-merge ``override`` into a copy of ``base``, rejecting keys ``base`` lacks."""
    if not isinstance(override, dict):
        raise RecipeError(f"{where.rstrip('.') or 'a recipe'} must be a mapping, got {_kind(override)}")
    _check_keys(override, base, where)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if f"{where}{key}" in _MAPPINGS:
            out[key] = {**base[key], **copy.deepcopy(_options(value, f"{where}{key}"))}
        elif value is None and f"{where}{key}" in _NULLABLE_SECTIONS:
            continue  # the defaults
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{where}{key} must be a mapping, got {_kind(value)}")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(path: Path) -> dict:
    """Read a recipe file (UTF-8 YAML, strict keys, no duplicate keys, checked version); returns
    the raw mapping. Every problem with the file is a :class:`RecipeError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}", hint="pass a YAML file, e.g. recipes/wanda-50.yaml")
    text = recipe_text(path)
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise RecipeError(
            f"{path}: duplicate key {exc.key!r} at line {exc.line} (first at line {exc.first_line})",
            hint="give each key once per mapping",
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")

    if llmcompressor_recipe.is_llmcompressor_recipe(data):  # NAME_stage: {..._modifiers: {...}}
        data = llmcompressor_recipe.to_prune_cli(data, path)
    if data.get("version") != RECIPE_VERSION:
        raise RecipeError(
            f"{path}: unsupported recipe version {data.get('version')!r}",
            hint=f"this prune-cli reads 'version: {RECIPE_VERSION}'",
        )
    _merge(DEFAULTS, data)  # key check with did-you-mean
    return data


def resolve(recipe: dict | None, overrides: dict | None) -> RunConfig:
    """Defaults < recipe < overrides (flags; ``None`` values mean "not given"), validated once.

    Any wrong key, type or value in either is a :class:`RecipeError` (or another
    :class:`BadInputError`) naming it, never another exception."""
    merged = _merge(DEFAULTS, {} if recipe is None else recipe)
    clean = _drop_none(overrides or {})
    if isinstance(clean.get("pattern"), str) and "sparsity" not in clean and "sparsity" in (recipe or {}):
        # A pattern given on the command line replaces the recipe's; N:M implies its own sparsity.
        if clean["pattern"].strip().lower() != "unstructured":
            merged["sparsity"] = None
    if "method" in clean and clean["method"] != merged["method"]:
        merged["method_options"] = {}  # the recipe's options belong to the recipe's method
    if "sparsity" in clean and "pattern" not in clean and merged["pattern"] != "unstructured":
        merged["pattern"] = "unstructured"
    merged = _merge(merged, clean)
    _check_types(merged)

    if merged["method"] in ACTIVATION_METHODS:
        # `--method wina --sparsity 0.4`: activation sparsity only
        activation_method = ACTIVATION_METHODS.get(merged["method"])
        if merged["activation"]["method"]:
            raise RecipeError("give the activation method either as `method` or under `activation`, not both")
        merged["activation"] = {**merged["activation"], "method": merged["method"], "sparsity": merged["sparsity"],
                                "options": {**merged["activation"]["options"], **merged["method_options"]}}
        merged["method"], merged["sparsity"], merged["method_options"] = None, None, {}
        activation_method.check_pattern_text(merged["pattern"])  # the patterns it declares
    activation = _activation(merged["activation"])
    if not merged["method"] and activation is None:
        raise RecipeError("no method given", hint="pass --method NAME or --recipe FILE")

    method = None
    pattern = None
    owl = None
    overrides: tuple[Override, ...] = ()
    if merged["method"]:
        method = _build_method(lambda name, options: WEIGHT_METHODS.get(name).from_options(options),
                               merged["method"], merged["method_options"], "method_options")
        pattern = parse_pattern(merged["pattern"], merged["sparsity"])
        method.check_pattern(pattern)
        owl = _owl(merged["layerwise"], pattern)
        overrides = _overrides(merged["overrides"], pattern)

    cal, ev = merged["calibration"], merged["evaluation"]
    if cal["text"] and cal["dataset"]:
        raise RecipeError("give calibration text files or a dataset, not both")
    _check_calibration_source(cal)
    _check_text_files(file_paths(cal["text"], "calibration.text"), file_paths(ev["text"], "evaluation.text"), ev["enabled"])
    gates = _gates(merged["gates"])
    if gates.active and not ev["enabled"]:
        raise RecipeError("a quality gate needs the evaluation", hint="drop --no-eval (evaluation.enabled: false)")
    tasks = task_names(ev["tasks"], "evaluation.tasks")
    if tasks and not ev["enabled"]:
        raise RecipeError("scoring tasks is part of the evaluation", hint="drop --no-eval (evaluation.enabled: false)")
    ungated = sorted(gates.gated_tasks() - set(tasks))
    if ungated:
        raise RecipeError(f"a gate names task {ungated[0]!r}, which is not scored",
                          hint=f"add it to the tasks: --eval-tasks {','.join([*tasks, *ungated])}")
    return RunConfig(
        method=None if method is None else method.name,
        method_options={} if method is None else method.options(),
        pattern=pattern,
        activation=activation,
        targets=Targets(
            linear_regexes(merged["targets"]["include"], "targets.include"),
            linear_regexes(merged["targets"]["exclude"], "targets.exclude"),
        ),
        owl=owl,
        overrides=overrides,
        calibration=CalibrationConfig(
            samples=cal["samples"],
            seqlen=cal["seqlen"],
            seed=cal["seed"],
            batch_size=cal["batch_size"],
            text=file_paths(cal["text"], "calibration.text"),
            dataset=cal["dataset"],
            split=cal["split"],
            column=cal["column"],
            chat_template=cal["chat_template"],
        ),
        evaluation=EvaluationConfig(
            enabled=ev["enabled"],
            windows=ev["windows"],
            seqlen=ev["seqlen"],
            batch_size=ev["batch_size"],
            text=file_paths(ev["text"], "evaluation.text"),
            tasks=tasks,
            task_limit=ev["task_limit"],
            num_fewshot=ev["num_fewshot"],
            task_include_path=file_paths(ev["task_include_path"], "evaluation.task_include_path"),
        ),
        device=merged["device"],
        dtype=merged["dtype"],
        save_dtype=merged["save_dtype"],
        backend=merged["backend"],
        bos=merged["bos"],
        gates=gates,
        moe=MoeOptions(merged["moe"]["min_tokens"], merged["moe"]["fallback"]),
        name=merged["name"],
        description=merged["description"],
    )


def _check_calibration_source(cal: dict) -> None:
    """``calibration.split``, ``column`` and ``chat_template`` select within a dataset or
    ``.jsonl`` files: given (other than their defaults) where the calibration text has none,
    they would be ignored without a word, so they are refused."""
    paths = file_paths(cal["text"], "calibration.text")
    jsonl = any(p.suffix == ".jsonl" for p in paths)
    source = "plain text files (no .jsonl)" if paths else "the bundled text"
    if cal["chat_template"] and not jsonl:
        raise RecipeError("calibration.chat_template applies to .jsonl calibration files",
                          hint="give --calib-text FILE.jsonl with rows holding a messages list")
    if cal["split"] != DEFAULTS["calibration"]["split"] and not cal["dataset"]:
        raise RecipeError(f"calibration.split {cal['split']!r} selects a split of a dataset, but the calibration text is {source}",
                          hint="drop --calib-split, or calibrate on --calib-dataset NAME")
    if cal["column"] != DEFAULTS["calibration"]["column"] and not cal["dataset"] and not jsonl:
        raise RecipeError(f"calibration.column {cal['column']!r} names a field of .jsonl rows or a dataset column, "
                          f"but the calibration text is {source}", hint="drop --calib-column, or give --calib-text FILE.jsonl")


def _check_text_files(calibration: tuple[Path, ...], evaluation: tuple[Path, ...], evaluating: bool) -> None:
    """A text file listed twice (it would be read twice: its windows drawn from a doubled text),
    or read for both calibration and evaluation (the perplexity would not be held out), is refused."""
    for key, paths in (("calibration.text", calibration), ("evaluation.text", evaluation)):
        seen: dict[str, Path] = {}
        for path in paths:
            real = os.path.realpath(path)
            if real in seen:
                raise RecipeError(f"{key} lists {path} twice" + (f" (also as {seen[real]})" if seen[real] != path else ""))
            seen[real] = path
    both = {os.path.realpath(p) for p in calibration} & {os.path.realpath(p) for p in evaluation}
    if both and evaluating:
        shared = next(p for p in evaluation if os.path.realpath(p) in both)
        raise RecipeError(f"{shared} is both calibration and evaluation text: the perplexity would not be held out",
                          hint="give --eval-text a file the calibration does not read")


def _gates(section: dict) -> Gates:
    ratio = section["max_ppl_ratio"]
    if ratio is not None and not settings.setting("gates.max_ppl_ratio").in_range(ratio):
        raise RecipeError(f"gates.max_ppl_ratio must be a positive number, got {ratio!r}",
                          hint="e.g. --max-ppl-ratio 1.5: the compressed perplexity at most 1.5x the dense")
    return Gates(max_ppl_ratio=None if ratio is None else float(ratio),
                 min_task_score=task_limits(section["min_task_score"], "gates.min_task_score"),
                 max_task_drop=task_limits(section["max_task_drop"], "gates.max_task_drop"))


def _activation(section: dict) -> ActivationConfig | None:
    if not section["method"]:
        return None

    method = _build_method(build_activation_method, section["method"], section["options"], "activation options")
    sparsity, allowed = section["sparsity"], settings.setting("activation.sparsity")
    if not allowed.in_range(sparsity):  # also None: activation.method needs a sparsity
        raise RecipeError(f"activation sparsity must be a number in {allowed.range_text()}, got {sparsity!r}",
                          hint="pass --sparsity 0.4")
    return ActivationConfig(method.name, float(sparsity), method.options(), section["allocation"], section["max_tokens"])


def _owl(section: dict, pattern: SparsityPattern) -> OwlSettings | None:
    """OWL's settings (``None``: uniform). The values were checked against the table; OWL's rule
    here relates two keys: it needs an unstructured pattern."""
    if section["method"] in (None, "uniform"):
        return None
    if not isinstance(pattern, Unstructured):
        raise RecipeError("layerwise owl needs an unstructured pattern", hint="drop --pattern N:M or --layerwise owl")
    return OwlSettings(m=auto_number(section["m"]), lam=auto_number(section["lambda"]), validation_windows=section["validation_windows"])


SPARSITY = settings.setting("sparsity")


def _overrides(entries: Any, pattern: SparsityPattern) -> tuple[Override, ...]:
    if not isinstance(entries, list):
        raise RecipeError("overrides must be a list of mappings")
    out = []
    allowed = {"blocks": None, "match": None, "sparsity": None}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RecipeError(f"overrides[{i}] must be a mapping")
        _check_keys(entry, allowed, f"overrides[{i}].")
        if "sparsity" not in entry:
            raise RecipeError(f"overrides[{i}] needs a sparsity")
        if not isinstance(pattern, Unstructured):
            raise RecipeError("per-layer sparsity overrides need an unstructured pattern")
        sparsity = entry["sparsity"]
        if not SPARSITY.in_range(sparsity):  # the same range as the recipe's sparsity
            raise RecipeError(f"overrides[{i}].sparsity must be in {SPARSITY.range_text()}, got {sparsity!r}")
        blocks = entry.get("blocks", [])
        blocks = [blocks] if isinstance(blocks, int) else blocks
        if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise RecipeError(f"overrides[{i}].blocks must be block indices")
        match = entry.get("match")
        if match is not None:
            string_value(match, f"overrides[{i}].match")
            (match,) = linear_regexes(match, f"overrides[{i}].match")
        if not blocks and match is None:
            raise RecipeError(f"overrides[{i}] needs blocks or match")
        out.append(Override(float(sparsity), tuple(blocks), match))
    return tuple(out)


def _drop_none(data: dict) -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None and value != () and value != []:
            out[key] = value
    return out
