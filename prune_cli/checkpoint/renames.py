"""Checkpoints whose stored tensor names differ from the model's: transformers' own renaming
rules (its weight conversions) applied to the stored names, and experts stored one tensor per
expert that the model holds fused (:class:`MergedTensor`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from prune_cli.checkpoint.weights import MergedTensor, WeightSource
from prune_cli.core.errors import CheckpointError


class RenamedWeights(WeightSource):
    """A source whose stored names differ from the model's ``state_dict`` names by transformers'
    load-time renamings (GPT-NeoX stores ``embed_out.weight`` for the model's ``lm_head.weight``;
    old checkpoints store LayerNorm ``gamma``/``beta``; Mixtral's ``block_sparse_moe`` is the
    model's ``mlp``) and merges (:class:`MergedTensor`: per-expert weights into the fused
    experts tensors). Tensors are asked for by model name; a merged one is built from its parts
    when it is read (one block's experts at a time)."""

    def __init__(self, inner: WeightSource, stored_by_model: dict[str, str | MergedTensor]):
        super().__init__()
        self.inner = inner
        self.description = inner.description
        self.private_tensors = inner.private_tensors
        consumed = {v for v in stored_by_model.values() if isinstance(v, str)}
        consumed |= {n for v in stored_by_model.values() if isinstance(v, MergedTensor) for part in v.parts for n in part}
        self._names = {name: name for name in inner.names() if name not in consumed}
        self._names.update(stored_by_model)

    @property
    def stored_dtype(self) -> torch.dtype | None:
        return self.inner.stored_dtype

    def layout(self) -> dict[str, str | MergedTensor]:
        return {name: stored for name, stored in self._names.items() if stored != name}

    def stored_shape(self, name: str) -> tuple[int, ...] | None:
        entry = self._names[name]
        if not isinstance(entry, MergedTensor):
            return self.inner.stored_shape(entry)
        stacks = []
        for part in entry.parts:
            shapes = {self.inner.stored_shape(n) for n in part}
            if None in shapes:
                return None
            if len(shapes) != 1:  # experts of different shapes cannot be stacked
                raise CheckpointError(f"{self.inner.file_of(part[0])}: the experts {part[0]} ... {part[-1]} have "
                                      f"different shapes ({sorted(shapes)})", hint="the checkpoint does not match its config.json")
            stacks.append((len(part), *shapes.pop()))
        if entry.concat_dim is None:
            return stacks[0]
        out = list(stacks[0])
        out[entry.concat_dim] = sum(stack[entry.concat_dim] for stack in stacks)
        return tuple(out)

    def file_of(self, name: str) -> str:
        entry = self._names[name]
        return self.inner.file_of(entry if isinstance(entry, str) else entry.parts[0][0])

    def prefetch(self, names: Iterable[str]) -> int:
        wanted = []
        for n in names:
            entry = self._names.get(n)
            if entry is not None:
                wanted += [x for part in entry.parts for x in part] if isinstance(entry, MergedTensor) else [entry]
        return self.inner.prefetch(wanted)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        wanted = []
        for n in names:
            entry = self._names[n]
            wanted += [x for part in entry.parts for x in part] if isinstance(entry, MergedTensor) else [entry]
        stored = self.inner.read(wanted)
        out = {}
        for n in names:
            entry = self._names[n]
            out[n] = entry.build(stored) if isinstance(entry, MergedTensor) else stored[entry]
        return out

    def close(self) -> None:
        self.inner.close()


def _merge_operations(converter) -> int | None | str:
    """``concat_dim`` of a converter that stacks experts along dim 0 and then (with two or more
    source patterns) concatenates the stacks along one dim; ``"unsupported"`` for any other."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops == [("MergeModulelist", 0)] and len(converter.source_patterns) == 1:
        return None
    if len(ops) == 2 and ops[0] == ("MergeModulelist", 0) and ops[1][0] == "Concatenate" \
            and isinstance(ops[1][1], int) and len(converter.source_patterns) >= 2:
        return ops[1][1]
    return "unsupported"


def _pattern_regex(pattern: str) -> re.Pattern:
    """A converter source pattern (``.experts.*.w1.weight``) as a regex capturing the index."""

    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


def checkpoint_renames(model: nn.Module, stored: Iterable[str]) -> dict[str, str | MergedTensor] | None:
    """Model name -> stored name (or :class:`MergedTensor`) for the stored tensors transformers
    renames or merges on load, ``{}`` when none is, or ``None`` when some stored tensor is
    converted in another way than stacking experts (then the checkpoint cannot be read tensor
    by tensor, and is loaded whole).

    Uses transformers' own conversion list for ``model`` (by class name, model type and the
    legacy renamings), so the names are the ones ``from_pretrained`` would give."""
    try:
        # transformers internals that not every version in the supported range has
        from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415
        from transformers.core_model_loading import WeightRenaming, rename_source_key  # noqa: PLC0415
    except ImportError:  # another transformers: no load-time renaming known
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out: dict = {}
    merged: dict[str, dict] = {}  # target -> {"converter", "parts": {pattern index: {expert: stored}}}
    for name in stored:
        renamed, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            if renamed != name:
                out[renamed] = name
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        found = _pattern_regex(pattern).search(name)
        if found is None or _merge_operations(converter) == "unsupported":
            return None
        entry = merged.setdefault(renamed, {"converter": converter, "parts": {}})
        entry["parts"].setdefault(converter.source_patterns.index(pattern), {})[int(found.group(1))] = name
    for target, entry in merged.items():
        converter, parts = entry["converter"], entry["parts"]
        if sorted(parts) != list(range(len(converter.source_patterns))):
            return None  # a pattern with no stored tensor
        experts = sorted(parts[0])
        if experts != list(range(len(experts))) or any(sorted(p) != experts for p in parts.values()):
            return None  # experts missing in one of the parts
        out[target] = MergedTensor(tuple(tuple(parts[i][e] for e in experts) for i in sorted(parts)),
                                   _merge_operations(converter))
    return out
