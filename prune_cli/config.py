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
    calibration: {samples: 32, seqlen: 512, seed: 0, batch_size: 8,
                  text: [files], dataset: NAME[:CONFIG], split: train, column: text}
    evaluation: {enabled: true, windows: 16, seqlen: 512, batch_size: 4, text: [files]}
    device: auto                   # auto | cpu | cuda
    dtype: float32                 # float32 | bfloat16 | float16

Unknown keys anywhere are errors with "did you mean".
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prune_cli.errors import RecipeError
from prune_cli.patterns import SparsityPattern, parse_pattern, pattern_to_text
from prune_cli.registry import did_you_mean

RECIPE_VERSION = 1

DEFAULTS: dict[str, Any] = {
    "version": RECIPE_VERSION,
    "name": None,
    "description": None,
    "method": None,
    "method_options": {},
    "sparsity": None,
    "pattern": "unstructured",
    "targets": {"include": [], "exclude": []},
    "calibration": {
        "samples": 32,
        "seqlen": 512,
        "seed": 0,
        "batch_size": 8,
        "text": [],
        "dataset": None,
        "split": "train",
        "column": "text",
    },
    "evaluation": {"enabled": True, "windows": 16, "seqlen": 512, "batch_size": 4, "text": []},
    "device": "auto",
    "dtype": "float32",
}

DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    text: tuple[Path, ...] = ()
    dataset: str | None = None
    split: str = "train"
    column: str = "text"


@dataclass(frozen=True)
class EvaluationConfig:
    enabled: bool = True
    windows: int = 16
    seqlen: int = 512
    batch_size: int = 4
    text: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Targets:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        """``name`` is the Linear's full module name, e.g. ``model.layers.3.mlp.up_proj``."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)


@dataclass(frozen=True)
class RunConfig:
    method: str
    pattern: SparsityPattern
    method_options: dict = field(default_factory=dict)
    targets: Targets = Targets()
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    device: str = "auto"
    dtype: str = "float32"
    name: str | None = None
    description: str | None = None

    def to_recipe(self) -> dict:
        """The resolved recipe, as YAML/JSON-ready data (for sparsity.json)."""
        cal, ev = self.calibration, self.evaluation
        return {
            "version": RECIPE_VERSION,
            "name": self.name,
            "description": self.description,
            "method": self.method,
            "method_options": dict(self.method_options),
            "sparsity": self.pattern.target_sparsity,
            "pattern": pattern_to_text(self.pattern),
            "targets": {"include": list(self.targets.include), "exclude": list(self.targets.exclude)},
            "calibration": {
                "samples": cal.samples, "seqlen": cal.seqlen, "seed": cal.seed, "batch_size": cal.batch_size,
                "text": [str(p) for p in cal.text], "dataset": cal.dataset, "split": cal.split, "column": cal.column,
            },
            "evaluation": {
                "enabled": ev.enabled, "windows": ev.windows, "seqlen": ev.seqlen, "batch_size": ev.batch_size,
                "text": [str(p) for p in ev.text],
            },
            "device": self.device,
            "dtype": self.dtype,
        }


def _check_keys(data: dict, allowed: dict, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"unknown key {where}{key!r}", hint=did_you_mean(str(key), list(allowed)))


def _merge(base: dict, override: dict, where: str = "") -> dict:
    """Deep-merge ``override`` into a copy of ``base``, rejecting keys ``base`` lacks."""
    _check_keys(override, base, where)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(base[key], dict) and key != "method_options":
            if not isinstance(value, dict):
                raise RecipeError(f"{where}{key} must be a mapping, got {type(value).__name__}")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(path: Path) -> dict:
    """Read a recipe file (strict keys, checked version); returns the raw mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}", hint="pass a YAML file, e.g. recipes/wanda-50.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    if data.get("version") != RECIPE_VERSION:
        raise RecipeError(
            f"{path}: unsupported recipe version {data.get('version')!r}",
            hint=f"this prune-cli reads 'version: {RECIPE_VERSION}'",
        )
    _merge(DEFAULTS, data)  # key check with did-you-mean
    return data


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _paths(value: Any, key: str) -> tuple[Path, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"{key} must be a list of file paths")
    return tuple(Path(v) for v in value)


def _regexes(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"{key} must be a list of regular expressions")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RecipeError(f"{key}: bad regular expression {pattern!r} ({exc})") from None
    return tuple(value)


def resolve(recipe: dict | None, overrides: dict | None) -> RunConfig:
    """Defaults < recipe < overrides (flags; ``None`` values mean "not given"), validated once."""
    merged = _merge(DEFAULTS, recipe or {})
    clean = _drop_none(overrides or {})
    if "pattern" in clean and "sparsity" not in clean and "sparsity" in (recipe or {}):
        # A pattern given on the command line replaces the recipe's; N:M implies its own sparsity.
        if clean["pattern"].strip().lower() != "unstructured":
            merged["sparsity"] = None
    if "sparsity" in clean and "pattern" not in clean and merged["pattern"] != "unstructured":
        merged["pattern"] = "unstructured"
    merged = _merge(merged, clean)

    if not merged["method"]:
        raise RecipeError("no method given", hint="pass --method NAME or --recipe FILE")
    from prune_cli.methods import WEIGHT_METHODS

    method_cls = WEIGHT_METHODS.get(str(merged["method"]))
    if not isinstance(merged["method_options"], dict):
        raise RecipeError("method_options must be a mapping")
    method = method_cls.from_options(merged["method_options"])

    sparsity = merged["sparsity"]
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))):
        raise RecipeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    pattern = parse_pattern(str(merged["pattern"]), sparsity)
    method.check_pattern(pattern)

    cal, ev = merged["calibration"], merged["evaluation"]
    if cal["text"] and cal["dataset"]:
        raise RecipeError("give calibration text files or a dataset, not both")
    if merged["device"] not in DEVICES:
        raise RecipeError(f"device must be one of {', '.join(DEVICES)}, got {merged['device']!r}")
    if merged["dtype"] not in DTYPE_NAMES:
        raise RecipeError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {merged['dtype']!r}")
    if not isinstance(ev["enabled"], bool):
        raise RecipeError("evaluation.enabled must be true or false")
    return RunConfig(
        method=method.name,
        method_options=method.options(),
        pattern=pattern,
        targets=Targets(
            _regexes(merged["targets"]["include"], "targets.include"),
            _regexes(merged["targets"]["exclude"], "targets.exclude"),
        ),
        calibration=CalibrationConfig(
            samples=_int(cal["samples"], "calibration.samples", 1),
            seqlen=_int(cal["seqlen"], "calibration.seqlen", 2),
            seed=_int(cal["seed"], "calibration.seed", 0),
            batch_size=_int(cal["batch_size"], "calibration.batch_size", 1),
            text=_paths(cal["text"], "calibration.text"),
            dataset=cal["dataset"],
            split=str(cal["split"]),
            column=str(cal["column"]),
        ),
        evaluation=EvaluationConfig(
            enabled=ev["enabled"],
            windows=_int(ev["windows"], "evaluation.windows", 1),
            seqlen=_int(ev["seqlen"], "evaluation.seqlen", 2),
            batch_size=_int(ev["batch_size"], "evaluation.batch_size", 1),
            text=_paths(ev["text"], "evaluation.text"),
        ),
        device=merged["device"],
        dtype=merged["dtype"],
        name=merged["name"],
        description=merged["description"],
    )


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
