"""An export names nothing of the machine that made it.

A checkpoint folder is meant to be copied, pushed to the hub and read elsewhere, so the files
written into it hold no absolute path of the run: not the virtual environment the bundled model
lives in, not the source folder, not the output folder, not the calibration or evaluation files.
:func:`make_portable` rewrites the report's fields that held such paths, in place, before the
report is written (and so before ``compress --json`` prints it):

* ``model``: a hub id as it is; a local folder by its name; a GGUF file by its file name; the
  bundled model by its stable name;
* ``model_source``: ``location`` becomes the hub id, the folder's name, the GGUF file's name or
  ``bundled:<model>``; a GGUF source adds the ``sha256`` of the file's bytes (so the name
  identifies the file), the bundled model its ``package`` and ``version``;
* ``output``: the checkpoint folder's name (the CLI still shows where it wrote it);
* ``calibration.source`` / ``evaluation.source``, ``recipe.calibration.text``,
  ``recipe.calibration.dataset`` (when a local file or folder), ``recipe.evaluation.text``,
  ``recipe.evaluation.task_include_path`` and ``tasks.include_path``: file names (the text's
  sha256 is recorded beside them).

Nothing that reads a report needs the paths: ``eval`` reads the method, pattern, perplexity and
dtype, ``verify`` the files and hashes, the resume state and the dense-baseline cache keep their
own fingerprints (with the real paths) outside the export.

:func:`drop_loading_leftovers` removes what transformers records of how the source was loaded
from the files it saves: ``local_files_only`` / ``is_local`` in ``tokenizer_config.json`` (a
reader of the pushed folder would be told to stay offline), a GGUF source's
``_model_name_or_path`` (its ``general.name``) in ``config.json``, and any absolute path.

:func:`write_legacy_rope` makes ``config.json`` read the same by transformers 5 and by older
readers: transformers 5 keeps RoPE settings in ``rope_parameters``; transformers 4 (and tools that
read ``config.json`` the way it does) read ``rope_theta``, ``partial_rotary_factor`` and
``rope_scaling`` at the top level and fall back to defaults without them (a model with
``rope_theta`` 100000 silently computed with 10000). The legacy fields are derived from
``rope_parameters``; transformers 5 reads them back to the same ``rope_parameters`` (checked on
the written file, else they are left out).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoConfig

from prune_cli.checkpoint.model_card import SourceFacts
from prune_cli.model.source import ModelSource

log = logging.getLogger(__name__)

# keys that say how a model or tokenizer was loaded, not what it is
CONFIG_LEFTOVERS = frozenset({"_name_or_path", "_model_name_or_path", "name_or_path", "gguf_file", "_commit_hash"})
TOKENIZER_LEFTOVERS = frozenset({
    "local_files_only", "is_local", "_is_local", "name_or_path", "_commit_hash", "gguf_file", "cache_dir",
    "force_download", "proxies", "token", "use_auth_token", "revision", "subfolder", "trust_remote_code",
    "_from_auto", "special_tokens_map_file", "tokenizer_file",
})


def portable_model(source: ModelSource, facts: SourceFacts) -> str:
    """The report's ``model``: the source's portable name (the bundled model keeps its name)."""
    return facts.name if source.kind in ("folder", "gguf") else source.describe()


def portable_model_source(source: ModelSource, facts: SourceFacts) -> dict:
    """The report's ``model_source`` without a local path (see the module docstring)."""
    location = source.location if source.kind == "hub" else facts.name
    out = {"kind": source.kind, "location": location, "gguf_file": source.gguf_file}
    if facts.sha256:
        out["sha256"] = facts.sha256
    if facts.package:
        out.update(package=facts.package, version=facts.version)
    return out


def file_name(path: str) -> str:
    """The last part of a path (``/data/calib.txt`` -> ``calib.txt``)."""
    return Path(str(path)).name or str(path)


def portable_text_source(source: str) -> str:
    """A text's ``source`` without folders: ``files:/a/x.txt,/b/y.jsonl`` ->
    ``files:x.txt,y.jsonl``; ``dataset:/data/set.jsonl:train:text`` -> ``dataset:set.jsonl:train:text``
    (a hub dataset's name stays); ``bundled:...`` as it is."""
    kind, _, rest = str(source).partition(":")
    if kind == "files":
        return "files:" + ",".join(file_name(p) for p in rest.split(","))
    if kind == "dataset":
        parts = rest.rsplit(":", 2)
        if len(parts) == 3:
            return f"dataset:{portable_dataset(parts[0])}:{parts[1]}:{parts[2]}"
    return source


def portable_dataset(name: str | None) -> str | None:
    """A ``--calib-dataset`` value: a local file or folder by its name, a hub dataset as it is."""
    return file_name(name) if name and Path(name).exists() else name


def _names(paths) -> list[str]:
    return [file_name(p) for p in paths or []]


def make_portable(report: dict, source: ModelSource, facts: SourceFacts) -> dict:
    """Rewrite ``report``'s path-holding fields in place (see the module docstring); returns it."""
    report["model"] = portable_model(source, facts)
    report["model_source"] = portable_model_source(source, facts)
    if report.get("output"):
        report["output"] = file_name(report["output"])
    for part in ("calibration", "evaluation"):
        if report.get(part) and report[part].get("source"):
            report[part]["source"] = portable_text_source(report[part]["source"])
    recipe = report.get("recipe") or {}
    if recipe.get("calibration"):
        recipe["calibration"]["text"] = _names(recipe["calibration"].get("text"))
        recipe["calibration"]["dataset"] = portable_dataset(recipe["calibration"].get("dataset"))
    if recipe.get("evaluation"):
        recipe["evaluation"]["text"] = _names(recipe["evaluation"].get("text"))
        recipe["evaluation"]["task_include_path"] = _names(recipe["evaluation"].get("task_include_path"))
    if report.get("tasks") and "include_path" in report["tasks"]:
        report["tasks"]["include_path"] = _names(report["tasks"]["include_path"])
    return report

# transformers 4's names of RoPE settings, where they are not rope_theta / partial_rotary_factor
_LEGACY_NAMES = {"gpt_neox": {"rope_theta": "rotary_emb_base", "partial_rotary_factor": "rotary_pct"}}
# per-layer-type rope_parameters: the top-level name of each layer type's theta, and the layer
# type whose scaling transformers 4 read as rope_scaling
_LEGACY_NESTED = {"gemma3_text": ({"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}, "full_attention")}
_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


def _drop_keys(data: dict, keys: frozenset) -> list[str]:
    """Remove ``keys`` and every entry whose value is an absolute path from ``data``; returns
    the keys removed."""
    dropped = [k for k, v in data.items() if k in keys or (isinstance(v, str) and os.path.isabs(v))]
    for key in dropped:
        del data[key]
    return dropped


def drop_loading_leftovers(folder: Path) -> list[str]:
    """Rewrite ``config.json`` and ``tokenizer_config.json`` in ``folder`` without the keys of
    :data:`CONFIG_LEFTOVERS` / :data:`TOKENIZER_LEFTOVERS` or absolute paths, in the layout
    transformers writes them (sorted keys, two-space indent); returns ``file:key`` of each key
    removed."""
    removed = []
    for name, keys, ascii_only in (("config.json", CONFIG_LEFTOVERS, True), ("tokenizer_config.json", TOKENIZER_LEFTOVERS, False)):
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        dropped = _drop_keys(data, keys)
        if dropped:
            path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=ascii_only) + "\n", encoding="utf-8")
            removed += [f"{name}:{key}" for key in dropped]
    if removed:
        log.debug("left out of the export: %s", ", ".join(removed))
    return removed


def _rope_scaling(parameters: dict) -> dict | None:
    """transformers 4's ``rope_scaling`` for one ``rope_parameters`` dict: ``None`` for the
    default type, else its entries but the theta and the partial rotary factor."""
    if parameters.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in parameters.items() if k not in _NOT_SCALING}


def legacy_rope_fields(config: dict) -> dict:
    """The top-level RoPE fields a transformers 4 reader of ``config`` (a ``config.json`` as a
    dict) needs to compute what transformers 5 computes from its ``rope_parameters``; keys the
    config already has are left as they are. ``{}`` when it has no RoPE settings, or per-layer-type
    settings of a model type not in :data:`_LEGACY_NESTED`."""
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict) or not parameters:
        return {}
    model_type = config.get("model_type")
    out: dict = {}
    if model_type in _LEGACY_NESTED:
        thetas, scaled = _LEGACY_NESTED[model_type]
        if not set(parameters) <= set(thetas) or any(_rope_scaling(parameters[k] or {}) for k in parameters if k != scaled):
            log.info("config.json: no legacy RoPE fields for these %s rope_parameters", model_type)
            return {}
        out = {name: parameters[kind]["rope_theta"] for kind, name in thetas.items() if "rope_theta" in (parameters.get(kind) or {})}
        scaling = _rope_scaling(parameters.get(scaled) or {})
    elif all(isinstance(v, dict) for v in parameters.values()):
        log.info("config.json: no legacy RoPE fields for per-layer-type rope_parameters of %s", model_type)
        return {}
    else:
        names = _LEGACY_NAMES.get(model_type, {})
        out = {names.get(key, key): parameters[key] for key in _NOT_SCALING if key in parameters}
        scaling = _rope_scaling(parameters)
    if scaling:
        out["rope_scaling"] = scaling
    return {k: v for k, v in out.items() if k not in config}


def _rope_parameters(folder: Path):

    return getattr(AutoConfig.from_pretrained(folder), "rope_parameters", None)


def write_legacy_rope(folder: Path) -> dict:
    """Add :func:`legacy_rope_fields` to ``folder``'s ``config.json`` when transformers 5 reads
    the file back to the same ``rope_parameters`` (else, or when it cannot read it, leave the
    file as it was, said in the log); returns the fields added."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    original = path.read_text(encoding="utf-8")
    config = json.loads(original)
    legacy = legacy_rope_fields(config)
    if not legacy:
        return {}
    try:
        before = _rope_parameters(folder)
        path.write_text(json.dumps({**config, **legacy}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        after = _rope_parameters(folder)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot read back: keep it as written
        after, before = None, exc
    if after != before:
        path.write_text(original, encoding="utf-8")
        log.warning("config.json: legacy RoPE fields left out (transformers reads them back as %s, not %s)", after, before)
        return {}
    return legacy
