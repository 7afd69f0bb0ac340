"""The run report: the same data feeds ``sparsity.json``, ``--json`` and the results table."""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

import prune_cli


def versions() -> dict:


    return {
        "prune_cli": prune_cli.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class LayerRecord:
    """What happened to one Linear."""

    name: str
    shape: tuple[int, int]
    method: str
    pattern: str
    target_sparsity: float
    achieved_sparsity: float  # fraction of exact zeros in the stored weight
    mask_sha256: str | None = None  # of the keep mask's bytes (row-major bool), first 16 hex digits
    weight_sha256: str | None = None  # of the pruned weight's bytes in the compute dtype
    # The method's own diagnostics for this layer (``PruneResult.info``; JSON-ready), or None.
    diagnostics: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "name": self.name,
            "shape": list(self.shape),
            "method": self.method,
            "pattern": self.pattern,
            "target_sparsity": round(self.target_sparsity, 6),
            "achieved_sparsity": round(self.achieved_sparsity, 6),
        }
        if self.mask_sha256 is not None:
            out.update(mask_sha256=self.mask_sha256, weight_sha256=self.weight_sha256)
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        return out


def masks_digest(layers: list[LayerRecord]) -> str | None:
    """One hash of every pruned layer's mask: the first 16 hex digits of the sha256 of the
    layers' names and mask hashes in order (``None`` when no mask was recorded). Two runs with
    the same inputs and seed give the same value."""

    if not layers or any(r.mask_sha256 is None for r in layers):
        return None
    digest = hashlib.sha256()
    for r in layers:
        digest.update(f"{r.name}={r.mask_sha256}\n".encode())
    return digest.hexdigest()[:16]


def tensor_sha256(t) -> str:
    """First 16 hex digits of the sha256 of a tensor's bytes (on the CPU, contiguous)."""

    data = t.detach().contiguous().cpu().reshape(-1)
    # a bool is one byte holding 0 or 1, so its bytes are those of .to(uint8); hashed in place, not copied
    return hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()[:16]


@dataclass
class Timings:
    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.values[key] = round(self.values.get(key, 0.0) + seconds, 3)


def overall_sparsity(layers: list[LayerRecord]) -> float:
    total = sum(r.shape[0] * r.shape[1] for r in layers)
    zeros = sum(r.achieved_sparsity * r.shape[0] * r.shape[1] for r in layers)
    return zeros / total if total else 0.0


def json_ready(data):
    """A copy of ``data`` that strict JSON parsers accept: every NaN / ±inf number becomes
    ``null`` and its path is listed under ``"non_finite"`` with what it was (e.g.
    ``{"ppl.compressed": "inf"}``), so a reader can tell "not measured" from "diverged"."""

    flagged: dict[str, str] = {}

    def walk(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            flagged[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    out = walk(data, "")
    if isinstance(out, dict) and (flagged or "non_finite" in out):
        out["non_finite"] = {**(out.get("non_finite") or {}), **flagged}
    return out


REPORT_SCHEMA_VERSION = 1
REPORT_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / f"sparsity-report.v{REPORT_SCHEMA_VERSION}.schema.json"


EVAL_SCHEMA_VERSION = 1
EVAL_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / f"eval-report.v{EVAL_SCHEMA_VERSION}.schema.json"


def validate_report(report: dict) -> None:
    """Check a sparsity report (``sparsity.json``, ``compress --json``) against its JSON Schema
    (:data:`REPORT_SCHEMA`), or an eval report (``eval --json``) against :data:`EVAL_SCHEMA`; raises ``jsonschema.ValidationError`` naming the path that is wrong.
    Needs ``jsonschema`` (the ``test`` extra)."""

    import jsonschema  # noqa: PLC0415 - optional dependency (tests only)

    path = EVAL_SCHEMA if report.get("format") == "prune-cli/eval-report" else REPORT_SCHEMA
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(report, schema, cls=jsonschema.Draft202012Validator)
