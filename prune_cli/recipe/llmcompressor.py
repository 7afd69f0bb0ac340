"""Recipes written for llm-compressor, read unchanged and translated into prune-cli's own recipe.

An llm-compressor recipe names stages, groups and modifiers::

    sparsity_stage:                      # a key ending in _stage
      sparsity_modifiers:                # a key ending in _modifiers
        SparseGPTModifier:               # the modifier's class name, then its arguments
          sparsity: 0.5
          mask_structure: "2:4"
          targets: ["Linear"]
          ignore: ["re:.*lm_head", "re:.*down_proj"]

:func:`is_llmcompressor_recipe` recognises one (a top-level ``*_stage`` mapping, which a
prune-cli recipe never has) and :func:`to_prune_cli` returns the equivalent prune-cli recipe
(``version: 1``, ``method``, ``method_options``, ``sparsity``, ``pattern``, ``targets``,
``layerwise``, ``overrides``), logging one line that says how it was read. Whatever the recipe
sets that prune-cli cannot honour (a quantization modifier, a second stage or modifier, a
training schedule, ``preserve_sparsity_mask``, an argument the modifier does not have, a
per-layer sparsity list whose length is not the number of target layers) is a
:class:`~prune_cli.core.errors.RecipeError` naming the key; nothing is dropped without a word.

The three pruning modifiers (llm-compressor's ``modifiers/pruning``):

* ``SparseGPTModifier`` -> ``sparsegpt``: ``block_size`` -> ``blocksize`` (128),
  ``dampening_frac`` -> ``percdamp`` (0.01);
* ``WandaPruningModifier`` -> ``wanda``;
* ``MagnitudePruningModifier`` -> ``magnitude`` with ``scope: matrix`` (llm-compressor removes
  the smallest weights of the whole matrix); its ``init_sparsity`` / ``final_sparsity`` /
  ``start`` / ``end`` describe a training schedule, accepted only where it is constant (one
  sparsity from the first step on: what a one-shot run does).

``mask_structure: "N:M"`` means, in llm-compressor, *prune* N of every M weights
(``torch.topk(..., prune_n, largest=False)``); prune-cli's ``pattern`` counts the weights KEPT.
So ``2:4`` stays ``2:4``, ``4:8`` stays ``4:8``, but ``1:4`` (prune 1 of 4) is prune-cli's ``3:4``
and ``3:4`` is ``1:4`` (:func:`keep_pattern`). ``"0:0"`` (and any ``0:M``) is unstructured.

Module matching follows compressed-tensors (``match_named_modules`` / ``is_match``): a ``re:X``
target matches a module whose full name ``re.match``-es ``X`` (anchored at the start only); a
bare string matches a module of exactly that full name or of that class (``Linear``,
``LlamaDecoderLayer``). A target selects every Linear inside the modules it matches; ``ignore``
is matched against each Linear's own name. prune-cli prunes only the Linears inside the decoder
blocks, so the translation keeps their meaning for those names (:func:`target_regex`,
:func:`ignore_regex`): ``Linear`` and ``*DecoderLayer`` select every block Linear, a module name
or ``re:`` pattern becomes a regular expression over the Linears' full names, and ``lm_head`` /
``re:.*lm_head`` in ``ignore`` are accepted as the no-ops they are here. Targets and ignores that
then match no Linear of the model are refused when the plan is built (``targets.include[i]`` /
``targets.exclude[i]``, see :meth:`prune_cli.recipe.config.Targets.check_selections`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_cli.core.errors import RecipeError, kind_of
from prune_cli.core.registry import did_you_mean
from prune_cli.recipe.settings import QUOTE_HINT

log = logging.getLogger(__name__)

REGEX = "re:"

# Arguments every llm-compressor modifier has (``Modifier``): bookkeeping, and the training
# schedule (start/end/update), checked by _check_oneshot_schedule.
BASE_ARGS = ("index", "group", "start", "end", "update")
# SparsityModifierBase (SparseGPT and Wanda) and what SparseGPT adds.
SPARSITY_ARGS = ("sparsity", "sparsity_profile", "mask_structure", "owl_m", "owl_lmbda", "sequential_update",
                 "targets", "ignore", "sequential_targets")  # sequential_targets: older releases
SPARSEGPT_ARGS = ("block_size", "dampening_frac", "preserve_sparsity_mask", "offload_hessians")
MAGNITUDE_ARGS = ("targets", "init_sparsity", "final_sparsity", "update_scheduler", "scheduler_args",
                  "mask_structure", "leave_enabled", "apply_globally")

MODIFIERS = {
    "SparseGPTModifier": ("sparsegpt", BASE_ARGS + SPARSITY_ARGS + SPARSEGPT_ARGS),
    "WandaPruningModifier": ("wanda", BASE_ARGS + SPARSITY_ARGS),
    "MagnitudePruningModifier": ("magnitude", BASE_ARGS + MAGNITUDE_ARGS),
}
# Schedules whose value is init_sparsity at every step when init_sparsity == final_sparsity.
CONSTANT_WHEN_EQUAL = ("cubic", "linear", "polynomial", "polynomial_decay")

# Class names that select every Linear of a decoder block; Conv layers are not in decoder LMs.
LINEAR_CLASSES = ("Linear", "__ALL_PRUNABLE__")
CONV_CLASSES = ("Conv1d", "Conv2d", "Conv3d")
# ignore entries of this form only name modules outside the decoder blocks (never pruned here).
_OUTSIDE_BLOCKS = re.compile(r"(?:re:)?\^?(?:\.\*)?(?:lm_head|embed_tokens|embed_out)(?:\.\*)?\$?")
_CLASS_NAME = re.compile(r"[A-Z_][A-Za-z0-9_]*")
_BLOCK_NAME = re.compile(r"(.+)\.(\d+)")
# where decoder blocks live in the families prune-cli loads (to recognise a "every decoder layer" regex)
_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "gpt_neox.layers", "transformer.h", "model.language_model.layers")


def is_llmcompressor_recipe(data: Any) -> bool:
    """A mapping with a top-level ``*_stage`` key: llm-compressor's recipe layout."""
    return isinstance(data, dict) and any(isinstance(k, str) and k.endswith("_stage") for k in data)


@dataclass
class _Reading:
    """What the translation found, for the one-line note."""

    modifier: str
    parts: list[str] = field(default_factory=list)

    def note(self) -> str:
        return f"read as an llm-compressor recipe: {self.modifier} " + ", ".join(self.parts)


def to_prune_cli(data: dict, source: str | Path = "recipe") -> dict:
    """The prune-cli recipe equivalent to the llm-compressor recipe ``data`` (read from
    ``source``), or a :class:`RecipeError` naming the first key prune-cli cannot honour.
    Logs one INFO line saying how the recipe was read."""
    where, name, args = _single_modifier(data, str(source))
    method, allowed = MODIFIERS[name]
    for key in args:
        if key not in allowed:
            raise RecipeError(f"{where}.{key}: {name} has no argument {key!r}",
                              hint=did_you_mean(str(key), list(allowed)))
    reading = _Reading(name)
    recipe: dict = {"version": 1, "name": Path(str(source)).stem, "method": method, "method_options": {}}
    _check_oneshot_schedule(args, where, name)
    if name == "MagnitudePruningModifier":
        _magnitude(args, where, recipe, reading)
    else:
        _sparsity_modifier(args, where, name, recipe, reading)
    recipe["description"] = reading.note()
    log.info("%s", reading.note())
    return recipe


def _single_modifier(data: dict, source: str) -> tuple[str, str, dict]:
    """The recipe's one stage, one group and one modifier: ``(key path, class name, arguments)``."""
    for key, value in data.items():
        if key == "args":
            if value not in (None, {}):
                raise RecipeError(f"{source}: args: recipe variables (eval(...)) are not supported",
                                  hint="write the values into the modifier's arguments")
        elif not (isinstance(key, str) and key.endswith("_stage")):
            raise RecipeError(f"{source}: unknown top-level key {key!r} in an llm-compressor recipe",
                              hint="an llm-compressor recipe holds NAME_stage: {NAME_modifiers: {Modifier: {...}}}")
    stages = [k for k in data if k != "args"]
    if len(stages) > 1:
        raise RecipeError(f"{source}: {stages[1]}: prune-cli runs one stage, the recipe has {len(stages)} ({', '.join(stages)})",
                          hint="keep the pruning stage; prune-cli does not quantize or train")
    stage = stages[0]
    body = data[stage]
    if not isinstance(body, dict):
        raise RecipeError(f"{source}: {stage} must be a mapping of NAME_modifiers groups, got {kind_of(body)}")
    modifiers: list[tuple[str, str, Any]] = []
    for group, mods in body.items():
        if group == "run_type":
            if mods != "oneshot":
                raise RecipeError(f"{source}: {stage}.run_type: prune-cli runs one shot, got {mods!r}")
            continue
        if not (isinstance(group, str) and group.endswith("_modifiers")):
            raise RecipeError(f"{source}: {stage}: unknown key {group!r}", hint="a stage holds NAME_modifiers groups")
        if not isinstance(mods, dict) or not mods:
            raise RecipeError(f"{source}: {stage}.{group} must be a mapping of modifiers, got {kind_of(mods)}")
        modifiers += [(f"{stage}.{group}.{mod}", mod, args) for mod, args in mods.items()]
    if not modifiers:
        raise RecipeError(f"{source}: {stage} has no modifier", hint="add e.g. sparsity_modifiers: {SparseGPTModifier: {sparsity: 0.5}}")
    for where, mod, _ in modifiers:
        if mod not in MODIFIERS:
            raise RecipeError(f"{source}: {where}: {_unsupported(mod)}", hint=did_you_mean(str(mod), list(MODIFIERS)))
    if len(modifiers) > 1:
        raise RecipeError(f"{source}: {modifiers[1][0]}: prune-cli runs one pruning modifier, the stage has {len(modifiers)}",
                          hint="keep one of " + ", ".join(m for _, m, _ in modifiers))
    where, mod, args = modifiers[0]
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecipeError(f"{source}: {where} must be a mapping of arguments, got {kind_of(args)}")
    return f"{source}: {where}", mod, args


def _unsupported(name: Any) -> str:
    text = str(name)
    if any(word in text for word in ("Quant", "GPTQ", "AWQ", "AutoRound", "QuIP")):
        return f"{text} quantizes; prune-cli prunes only (SparseGPTModifier, WandaPruningModifier, MagnitudePruningModifier)"
    return f"{text} is not a modifier prune-cli runs (SparseGPTModifier, WandaPruningModifier, MagnitudePruningModifier)"


# ----------------------------------------------------------------------------- arguments


def _number(value: Any, key: str, low: float, high: float, high_open: bool = True) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bound = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise RecipeError(f"{key} must be a number in {bound}, got {value!r}")
    return float(value)


def _check_oneshot_schedule(args: dict, where: str, name: str) -> None:
    """``start``/``end``/``update`` schedule a modifier over training steps; prune-cli prunes
    once. Accepted: absent (or null), ``start`` 0 or -1 (from the first step on), and for
    MagnitudePruningModifier an ``end`` after the start and any ``update`` (its sparsity is
    constant, see :func:`_magnitude`)."""
    start, end, update = args.get("start"), args.get("end"), args.get("update")
    if start is not None and start not in (0, -1):
        raise RecipeError(f"{where}.start: {start!r} starts a training schedule; prune-cli prunes once",
                          hint="drop start (or set 0)")
    if name != "MagnitudePruningModifier":
        for key in ("end", "update"):
            if args.get(key) is not None:
                raise RecipeError(f"{where}.{key}: a training schedule argument; {name} runs once in prune-cli",
                                  hint=f"drop {key}")
        return
    if end is not None and (isinstance(end, bool) or not isinstance(end, (int, float)) or end <= 0):
        raise RecipeError(f"{where}.end: {end!r} ends the schedule before the first step (nothing would be pruned)",
                          hint="drop end")
    if update is not None and (isinstance(update, bool) or not isinstance(update, (int, float)) or update < 0):
        raise RecipeError(f"{where}.update must be a non-negative number, got {update!r}")


def keep_pattern(mask_structure: Any, key: str) -> str | None:
    """prune-cli's pattern (N KEPT of every M) for llm-compressor's ``mask_structure`` (N
    PRUNED of every M); ``None`` for unstructured (``"0:0"``, or any ``0:M``).

    ``"2:4"`` -> ``"2:4"``, ``"4:8"`` -> ``"4:8"``, ``"1:4"`` -> ``"3:4"``, ``"3:4"`` -> ``"1:4"``."""
    if not isinstance(mask_structure, str):
        raise RecipeError(f"{key} must be a string \"N:M\", got {kind_of(mask_structure)} ({mask_structure!r})",
                          hint=QUOTE_HINT.replace("pattern", "mask_structure") if isinstance(mask_structure, int) else None)
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", mask_structure)
    if not match:
        raise RecipeError(f"{key} must be \"N:M\" (prune N of every M) or \"0:0\" (unstructured), got {mask_structure!r}")
    pruned, m = int(match.group(1)), int(match.group(2))
    if pruned == 0:
        return None
    if m == 0 or pruned >= m:
        raise RecipeError(f"{key} {mask_structure!r} prunes {pruned} of every {m}: it must prune fewer than M",
                          hint="e.g. \"2:4\" prunes 2 of every 4")
    return f"{m - pruned}:{m}"


def _sparsity_modifier(args: dict, where: str, name: str, recipe: dict, reading: _Reading) -> None:
    """SparseGPTModifier / WandaPruningModifier arguments into ``recipe``."""
    if "sparsity" not in args:
        raise RecipeError(f"{where}: sparsity is required", hint="e.g. sparsity: 0.5")
    sparsity = args["sparsity"]
    mask = args.get("mask_structure", "0:0")
    pattern = keep_pattern(mask, f"{where}.mask_structure")
    per_layer = isinstance(sparsity, list)
    if per_layer:
        if not sparsity:
            raise RecipeError(f"{where}.sparsity is an empty list")
        values = [_number(v, f"{where}.sparsity[{i}]", 0.0, 1.0) for i, v in enumerate(sparsity)]
    elif sparsity is not None:
        values = [_number(sparsity, f"{where}.sparsity", 0.0, 1.0)]
    else:
        values = []
    if pattern is None:
        if not values:
            raise RecipeError(f"{where}.sparsity: an unstructured mask (mask_structure {mask!r}) needs a sparsity")
        recipe["pattern"] = "unstructured"
        recipe["sparsity"] = values[0] if not per_layer else round(sum(values) / len(values), 12)  # per block: overrides
        reading.parts.append(f"sparsity {sparsity}" + ("" if mask == "0:0" else f" mask_structure {mask} (unstructured)"))
    else:
        keep, m = (int(x) for x in pattern.split(":"))
        implied = 1 - keep / m
        for i, value in enumerate(values):
            if abs(value - implied) > 1e-9:
                key = f"{where}.sparsity" + (f"[{i}]" if per_layer else "")
                raise RecipeError(f"{key} {value:g} contradicts mask_structure {mask!r}, which prunes {m - keep} of every {m} "
                                  f"(sparsity {implied:g})", hint=f"set sparsity: {implied:g} or drop it")
        recipe["pattern"] = pattern
        per_layer = False  # every value equals the pattern's sparsity
        reading.parts.append(f"sparsity {implied:g} mask_structure {mask} (prune {m - keep} of {m} = prune-cli pattern {pattern}, "
                             f"{keep} kept of every {m})")
    _owl(args, where, recipe, reading, per_layer, pattern)
    if name == "SparseGPTModifier":
        _sparsegpt_options(args, where, recipe, reading)
    if args.get("sequential_update") not in (None, True, False):
        raise RecipeError(f"{where}.sequential_update must be true or false, got {args['sequential_update']!r}")
    _sequential_targets(args.get("sequential_targets"), f"{where}.sequential_targets")
    targets = args.get("targets", ["Linear"])
    _targets(targets, args.get("ignore", []), where, recipe, reading)
    if per_layer:
        _per_layer(values, _as_list(targets, f"{where}.targets"), f"{where}.sparsity", recipe, reading)


def _owl(args: dict, where: str, recipe: dict, reading: _Reading, per_layer: bool, pattern: str | None) -> None:
    """``sparsity_profile: owl`` with ``owl_m`` and ``owl_lmbda`` (all three or none, as
    llm-compressor requires) -> ``layerwise: {method: owl, m, lambda}``."""
    profile, m, lam = args.get("sparsity_profile"), args.get("owl_m"), args.get("owl_lmbda")
    if profile is None and m is None and lam is None:
        return
    if not isinstance(profile, str) or profile.lower() != "owl":
        if profile is not None:
            raise RecipeError(f"{where}.sparsity_profile must be 'owl', got {profile!r}")
    missing = [k for k, v in (("sparsity_profile", profile), ("owl_m", m), ("owl_lmbda", lam)) if v is None]
    if missing:
        raise RecipeError(f"{where}.{missing[0]}: OWL needs sparsity_profile: owl, owl_m and owl_lmbda together",
                          hint=f"add {', '.join(missing)}")
    if per_layer:
        raise RecipeError(f"{where}.sparsity_profile: OWL computes the per-layer sparsities; give one sparsity, not a list")
    if pattern is not None:
        raise RecipeError(f"{where}.sparsity_profile: OWL needs an unstructured mask, mask_structure is {args.get('mask_structure')!r}",
                          hint="use mask_structure \"0:0\" with OWL")
    recipe["layerwise"] = {"method": "owl", "m": _number(m, f"{where}.owl_m", 1.0, 1000.0, high_open=False),
                           "lambda": _number(lam, f"{where}.owl_lmbda", 0.0, 0.5, high_open=False)}
    reading.parts.append(f"sparsity_profile owl (owl_m {m:g}, owl_lmbda {lam:g})")


def _sparsegpt_options(args: dict, where: str, recipe: dict, reading: _Reading) -> None:
    """``block_size`` -> ``blocksize``, ``dampening_frac`` -> ``percdamp``;
    ``preserve_sparsity_mask: true`` (extend a checkpoint's existing mask) is refused;
    ``offload_hessians`` only moves memory and changes no result."""
    options = recipe["method_options"]
    block = args.get("block_size", 128)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise RecipeError(f"{where}.block_size must be a positive integer, got {block!r}")
    damp = args.get("dampening_frac", 0.01)
    options["blocksize"] = block
    options["percdamp"] = _number(damp, f"{where}.dampening_frac", 0.0, 1.0)
    preserve = args.get("preserve_sparsity_mask", False)
    if preserve is not False:
        raise RecipeError(f"{where}.preserve_sparsity_mask: {preserve!r} is not supported: prune-cli computes each mask afresh",
                          hint="drop preserve_sparsity_mask")
    if args.get("offload_hessians") not in (None, True, False):
        raise RecipeError(f"{where}.offload_hessians must be true or false, got {args['offload_hessians']!r}")
    reading.parts.append(f"block_size {block} -> blocksize, dampening_frac {damp:g} -> percdamp")


def _sequential_targets(value: Any, key: str) -> None:
    """Older releases let a modifier name its sequential targets (the modules calibrated and
    re-run one at a time). prune-cli always goes one decoder block at a time: accepted when
    they are the decoder layers (a ``*DecoderLayer`` class), refused otherwise."""
    if value is None:
        return
    for item in _as_list(value, key):
        if not (isinstance(item, str) and item.endswith("DecoderLayer")):
            raise RecipeError(f"{key}: {item!r}: prune-cli calibrates one decoder block at a time",
                              hint="drop sequential_targets, or name the decoder layer class (e.g. LlamaDecoderLayer)")


def _magnitude(args: dict, where: str, recipe: dict, reading: _Reading) -> None:
    """MagnitudePruningModifier: a constant schedule (``init_sparsity == final_sparsity``) of
    unstructured masks over each whole matrix -> ``magnitude`` with ``scope: matrix``."""
    for key in ("targets", "init_sparsity", "final_sparsity"):
        if key not in args:
            raise RecipeError(f"{where}: {key} is required")
    init = _number(args["init_sparsity"], f"{where}.init_sparsity", 0.0, 1.0)
    final = _number(args["final_sparsity"], f"{where}.final_sparsity", 0.0, 1.0)
    if abs(init - final) > 1e-12:
        raise RecipeError(f"{where}.final_sparsity: init_sparsity {init:g} -> final_sparsity {final:g} is a training schedule; "
                          "prune-cli prunes once", hint=f"set init_sparsity and final_sparsity to the same value, e.g. {final:g}")
    scheduler = args.get("update_scheduler", "cubic")
    if scheduler not in CONSTANT_WHEN_EQUAL:
        raise RecipeError(f"{where}.update_scheduler: {scheduler!r} is not supported",
                          hint=f"one of {', '.join(CONSTANT_WHEN_EQUAL)} (constant when init_sparsity equals final_sparsity)")
    scheduler_args = args.get("scheduler_args", {}) or {}
    if not isinstance(scheduler_args, dict) or set(scheduler_args) - {"exponent"}:
        raise RecipeError(f"{where}.scheduler_args: only exponent is supported, got {scheduler_args!r}")
    mask = args.get("mask_structure", "unstructured")
    if mask != "unstructured":
        raise RecipeError(f"{where}.mask_structure: {mask!r} is not supported for MagnitudePruningModifier",
                          hint="llm-compressor's magnitude masks are unstructured, channel, filter or block_*; prune-cli runs unstructured")
    if args.get("apply_globally", False) is not False:
        raise RecipeError(f"{where}.apply_globally: global magnitude pruning is not supported (llm-compressor does not implement it either)")
    if args.get("leave_enabled") not in (None, True, False):
        raise RecipeError(f"{where}.leave_enabled must be true or false, got {args['leave_enabled']!r}")
    recipe.update(sparsity=final, pattern="unstructured", method_options={"scope": "matrix"})
    reading.parts.append(f"init_sparsity = final_sparsity {final:g} (one shot), unstructured over each whole matrix (scope matrix)")
    _targets(args["targets"], [], where, recipe, reading, inside=False)


# ----------------------------------------------------------------------------- targets / ignore


def _as_list(value: Any, key: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{key} must be a string or a list of strings, got {value!r}")
    return value


def module_boundary(regex: str) -> str:
    """``regex`` with each end anchor (``$`` or ``\\Z`` outside a character class) also
    accepting the end of a module-name component (a following ``.``): a target that matches a
    module also selects the Linears inside it, whose names continue after a dot."""
    out, i, n = [], 0, len(regex)
    while i < n:
        char = regex[i]
        if char == "\\":
            pair = regex[i:i + 2]
            out.append(r"(?=\.|\Z)" if pair == r"\Z" else pair)
            i += 2
        elif char == "[":  # a character class, copied as it is ("[]a]" and "[^]a]" hold a literal ])
            j = i + 1 + (regex[i + 1:i + 2] == "^")
            j += regex[j:j + 1] == "]"
            while j < n and regex[j] != "]":
                j += 2 if regex[j] == "\\" else 1
            out.append(regex[i:j + 1])
            i = j + 1
        else:
            out.append(r"(?=\.|$)" if char == "$" else char)
            i += 1
    return "".join(out)


def target_regex(target: str, key: str, inside: bool = True) -> str | None:
    """The prune-cli regex (searched in a Linear's full name) for one llm-compressor target,
    or ``None`` when the target selects every Linear of the decoder blocks (``Linear``,
    ``__ALL_PRUNABLE__``, a ``*DecoderLayer`` class). A ``re:X`` target matches a module whose
    name ``re.match``-es X, and (``inside``: SparseGPT, Wanda) selects the Linears inside it:
    ``^(?:X)`` with its end anchors at a module boundary. A bare module name N selects N and
    the Linears inside it. Without ``inside`` (MagnitudePruningModifier prunes the matched
    modules' own weights) a target matches the Linear's own name, and a decoder layer, which
    has no weight of its own, is refused."""
    if target.startswith(REGEX):
        pattern = target[len(REGEX):]
        _compile(pattern, key)
        return f"^(?:{module_boundary(pattern) if inside else pattern})"
    if target in LINEAR_CLASSES:
        return None
    if _CLASS_NAME.fullmatch(target) and target.endswith("DecoderLayer"):
        if not inside:
            raise RecipeError(f"{key}: {target!r} has no weight of its own: MagnitudePruningModifier would prune nothing",
                              hint="use targets: [Linear] or re: patterns naming the Linears")
        return None
    if target == "__ALL__":
        raise RecipeError(f"{key}: '__ALL__' is no longer accepted by llm-compressor", hint="use targets: [Linear]")
    if target in CONV_CLASSES:
        raise RecipeError(f"{key}: {target!r}: decoder blocks hold no {target} layers", hint="use targets: [Linear]")
    if _CLASS_NAME.fullmatch(target):
        raise RecipeError(f"{key}: class name {target!r} cannot be mapped to the Linears of a decoder block",
                          hint="use Linear, the decoder layer class, a module name or a re: pattern, e.g. 're:.*mlp'")
    return "^" + re.escape(target) + (r"(?:\.|$)" if inside else "$")


def ignore_regex(entry: str, key: str) -> str | None:
    """The prune-cli exclude regex for one llm-compressor ``ignore`` entry, matched as
    llm-compressor matches it against each Linear's own full name (``re:X``: ``re.match``; a
    bare name: equal), or ``None`` for an entry that only names modules outside the decoder
    blocks (``lm_head``, ``re:.*lm_head``), which prune-cli never prunes."""
    if _OUTSIDE_BLOCKS.fullmatch(entry):
        return None
    if entry.startswith(REGEX):
        pattern = entry[len(REGEX):]
        _compile(pattern, key)
        return f"^(?:{pattern})"
    if entry in LINEAR_CLASSES:
        raise RecipeError(f"{key}: {entry!r} ignores every Linear: nothing would be pruned")
    if _CLASS_NAME.fullmatch(entry):
        raise RecipeError(f"{key}: class name {entry!r} cannot be mapped to the Linears of a decoder block",
                          hint="name the modules instead, e.g. 're:.*mlp.down_proj'")
    return "^" + re.escape(entry) + "$"


def _compile(pattern: str, key: str) -> None:
    if not pattern:
        raise RecipeError(f"{key}: 're:' with an empty pattern")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RecipeError(f"{key}: bad regular expression {pattern!r} ({exc})") from None


def _targets(targets: Any, ignore: Any, where: str, recipe: dict, reading: _Reading, inside: bool = True) -> None:
    """``targets`` / ``ignore`` -> ``targets.include`` / ``targets.exclude``."""
    include: list[str] = []
    every = False
    for i, target in enumerate(_as_list(targets, f"{where}.targets")):
        regex = target_regex(target, f"{where}.targets[{i}]", inside)
        every = every or regex is None
        if regex is not None and regex not in include:
            include.append(regex)
    include = [] if every else include
    exclude: list[str] = []
    shown: list[str] = []
    for i, entry in enumerate(_as_list(ignore if ignore is not None else [], f"{where}.ignore")):
        regex = ignore_regex(entry, f"{where}.ignore[{i}]")
        if regex is None:
            shown.append(f"{entry!r} (outside the decoder blocks: never pruned)")
            log.debug("%s.ignore[%d] %r names modules outside the decoder blocks, which prune-cli never prunes", where, i, entry)
        elif regex not in exclude:
            exclude.append(regex)
            shown.append(f"{entry!r} -> targets.exclude[{len(exclude) - 1}] {regex!r}")
    recipe["targets"] = {"include": include, "exclude": exclude}
    reading.parts.append("targets " + (f"{targets!r} -> every Linear of the decoder blocks" if every
                                       else f"{targets!r} -> targets.include {include!r}"))
    if every:
        reading.parts.append("lm_head and other modules outside the decoder blocks stay dense")
    if shown:
        reading.parts.append("ignore [" + ", ".join(shown) + "]")


def _per_layer(values: list[float], targets: list[str], key: str, recipe: dict, reading: _Reading) -> None:
    """A sparsity list: one value per target layer, paired in the model's module order, as
    llm-compressor reads it; mapped onto per-block ``overrides`` when the targets are the
    decoder layers:

    * named one by one (``model.layers.0``, ``model.layers.1``): the list must have one value
      per name (each name must exist: :meth:`~prune_cli.recipe.config.Targets.check_selections`);
    * all of them (a ``*DecoderLayer`` class, ``re:model.layers.\\d+$``): block i gets value i.
      A list longer than the model's blocks is refused when the plan is built (an override of
      a block the model lacks); the targets are limited to the blocks the list covers, so a
      model with more blocks keeps the others dense (the note says which blocks are pruned).
    """
    names = [_BLOCK_NAME.fullmatch(t) for t in targets]
    if all(names):
        if len(values) != len(targets):
            raise RecipeError(f"{key} has {len(values)} values for {len(targets)} target layers",
                              hint="give one sparsity per layer named in targets")
        blocks = sorted(int(n.group(2)) for n in names)  # llm-compressor pairs them in module order
    elif len(targets) == 1 and _every_block(targets[0], len(values)):
        blocks = list(range(len(values)))
        recipe["targets"]["include"] = ["^\\D*\\.(?:" + "|".join(map(str, blocks)) + ")\\."]
        reading.parts.append(f"targets limited to the blocks the list covers: targets.include {recipe['targets']['include']!r} "
                             f"(a model with more than {len(blocks)} blocks keeps the others dense)")
    else:
        raise RecipeError(f"{key}: a per-layer list needs targets that are the decoder layers, got {targets!r}",
                          hint="targets: ['re:model.layers.\\d+$'] (one value per decoder layer), or use one sparsity")
    recipe["overrides"] = [{"blocks": [b], "sparsity": v} for b, v in zip(blocks, values, strict=False)]
    reading.parts.append(f"per-layer sparsity {values} -> overrides for blocks {blocks}")


def _every_block(target: str, count: int) -> bool:
    """``target`` selects decoder layers themselves, blocks ``0..count-1`` in order (a
    ``*DecoderLayer`` class, or a ``re:`` pattern matching ``<blocks path>.<i>`` and none of
    the modules inside a block)."""
    if _CLASS_NAME.fullmatch(target) and target.endswith("DecoderLayer"):
        return True
    if not target.startswith(REGEX):
        return False
    pattern = re.compile(target[len(REGEX):])
    for path in _BLOCK_PATHS:
        inside = (f"{path}.0.mlp", f"{path}.0.self_attn.q_proj", f"{path}.0.mlp.down_proj", path, "lm_head")
        if all(pattern.match(f"{path}.{i}") for i in range(count)) and not any(pattern.match(n) for n in inside):
            return True
    return False
