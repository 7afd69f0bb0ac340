"""Writing a checkpoint into a run's staging folder, block by block as the last walk finishes them.

The checkpoint is a plain Hugging Face folder (safetensors with real zeros in the save dtype,
``config.json``, ``generation_config.json``, tokenizer) plus ``sparsity.json``, prune-cli's report,
and, with activation sparsity, ``activation_sparsity.safetensors``. The report is written last
and lists every other file with its size, so a later ``--overwrite`` can tell a folder prune-cli
wrote from one it did not (:mod:`prune_cli.checkpoint.output`), and so a folder whose report is missing was
never finished. Moving the folder into place is :meth:`prune_cli.checkpoint.output.OutputTarget.commit`'s job.

:class:`CheckpointWriter` lays the weight shards out before the walk (:mod:`prune_cli.checkpoint.shards`),
writes everything outside the decoder blocks at once, and each block's tensors when the walk is
done with it, in their plain form (activation sparsifiers unwrapped, WINA's transform as folded
weights with norm weight 1): the names ``save_pretrained`` writes, tied weights once. Each block's
activation-sparsity tensors go to a file of their own in the work folder, merged at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prune_cli.activation.modules import unwrap_all
from prune_cli.activation.transform import rotated_norms, round_transformed, strip_transform
from prune_cli.checkpoint.files import tensor_digests
from prune_cli.checkpoint.model_card import recorded_source, source_facts, write_model_card
from prune_cli.checkpoint.model_state import state_names, tied_names
from prune_cli.checkpoint.output import OWNER_FILE, REPORT_FILE, WORK_FOLDER, fix_modes
from prune_cli.checkpoint.portable import drop_loading_leftovers, make_portable, write_legacy_rope
from prune_cli.checkpoint.shards import StreamingCheckpoint, TensorSpec
from prune_cli.checkpoint.weights import SAFETENSORS_DTYPES, LayeredWeights, SafetensorsWeights
from prune_cli.core.dtypes import DTYPE_NAMES_BY_DTYPE
from prune_cli.core.records import json_ready
from prune_cli.model.conv1d import stored_shape
from prune_cli.model.structure import prepare_for_save
from prune_cli.runtime import ACTIVATION_FILE, activation_tensors
from prune_cli.streaming.driver import Stage

log = logging.getLogger(__name__)



def file_list(folder: Path) -> list[dict]:
    """Every file under ``folder`` (but the report, the owner record and the work folder): name
    and bytes."""
    out = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if name not in (REPORT_FILE, OWNER_FILE) and not name.startswith(WORK_FOLDER + "/"):
            out.append({"name": name, "bytes": path.stat().st_size})
    return out


def write_report(folder: Path, report: dict) -> dict:
    """Write ``report`` as strict JSON (non-finite numbers as null, flagged) into ``folder``;
    returns what was written."""
    data = json_ready(report)
    (Path(folder) / REPORT_FILE).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return data


def _saved_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def source_layout(driver) -> dict:
    """How the source checkpoint stores the model's tensors where it differs from their names
    (:meth:`~prune_cli.checkpoint.weights.WeightSource.layout`); an export keeps that layout."""
    return driver.weights.layout() if driver.weights is not None else {}


def stored_tensors(layout: dict, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model tensor ``name`` as the checkpoint stores it: under its stored name, or in parts
    (per-expert weights of a fused experts tensor, :class:`~prune_cli.checkpoint.weights.MergedTensor`)."""
    entry = layout.get(name, name)
    return {entry: tensor} if isinstance(entry, str) else entry.split(tensor)


def weight_specs(driver, dtype: torch.dtype) -> list[TensorSpec]:
    """Stored name, shape and saved dtype of every tensor of the checkpoint, in ``state_dict``
    order (tied duplicates left out, as ``save_pretrained`` does), in the source's layout
    (:func:`source_layout`: e.g. Mixtral's experts one tensor per expert and projection)."""
    model = driver.model
    tied = tied_names(model)
    inside = driver.path + "."
    layout = source_layout(driver)
    specs = []
    for name in state_names(model):
        if name in tied:
            continue
        owner, local = model, name
        if name.startswith(inside):
            index, _, local = name[len(inside):].partition(".")
            owner = driver.template(int(index))
        tensor = owner.get_parameter(local) if _is_param(owner, local) else owner.get_buffer(local)
        entry = layout.get(name, name)
        if isinstance(entry, str):
            specs.append(TensorSpec(entry, stored_shape(owner, local, tuple(tensor.shape)), _saved_dtype(tensor, dtype)))
        else:
            part = entry.part_shape(tuple(tensor.shape))
            specs += [TensorSpec(n, part, _saved_dtype(tensor, dtype)) for p in entry.parts for n in p]
    return specs


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


def checkpoint_bytes(specs: list[TensorSpec]) -> int:
    return sum(s.nbytes for s in specs)


@torch.no_grad()
def round_block(block: nn.Module, dtype: torch.dtype) -> None:
    """Round ``block``'s floating parameters and persistent buffers to ``dtype`` in place (they
    keep their dtype), so the block computes what its export in ``dtype`` computes once loaded;
    readers of a WINA-transformed norm are rounded in their saved, folded form
    (:func:`~prune_cli.activation.transform.round_transformed`)."""

    readers = {id(r.weight) for m in rotated_norms(block).values() for r in m._readers}
    round_transformed(block, dtype)
    for name in state_names(block):
        tensor = block.get_parameter(name) if _is_param(block, name) else block.get_buffer(name)
        if tensor.is_floating_point() and tensor.dtype != dtype and id(tensor) not in readers:
            tensor.data.copy_(tensor.data.to(dtype))


class RoundStage(Stage):
    """A walk stage: :func:`round_block` on every block (the export's dtype, before the
    compressed evaluation sees the block)."""

    timing_key = "export"

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def on_block(self, index: int, block: nn.Module) -> None:
        round_block(block, self.dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def needs_rounding(save: torch.dtype, compute: torch.dtype) -> bool:
    """Whether weights computed in ``compute`` lose precision when saved in ``save``."""
    return save != compute and torch.finfo(save).bits <= torch.finfo(compute).bits


class ScratchBlocks:
    """Blocks a walk modified, kept for the next walk in the compute dtype (a ``block-N``
    safetensors file each, in ``folder``); :meth:`source` reads them over the original weights."""

    def __init__(self, folder: Path, driver):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.driver = driver

    @torch.no_grad()
    def write_block(self, index: int, block: nn.Module) -> None:

        prefix = self.driver.name(index)
        tensors = {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        tmp = self.folder / f".block-{index:05d}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.folder / f"block-{index:05d}.safetensors")

    def source(self, base):

        return LayeredWeights(SafetensorsWeights(self.folder), base)


class CheckpointWriter:
    """The checkpoint of ``driver``'s model in ``folder`` (a staging folder), weights in
    ``dtype`` (see the module docstring)."""

    def __init__(self, folder: Path, driver, dtype: torch.dtype, resume: bool = False):
        self.folder = Path(folder)
        self.driver = driver
        self.dtype = dtype
        self.specs = weight_specs(driver, dtype)
        self.layout = source_layout(driver)
        self.weights = StreamingCheckpoint(self.folder, self.specs, resume=resume)
        self.work = self.folder / WORK_FOLDER
        self.work.mkdir(exist_ok=True)
        self._inside = driver.path + "."
        self._done = self.work / "written-blocks.json"  # blocks already in the shards (for a resumed run)
        self.blocks: set[int] = set()
        if resume and self._done.is_file():
            self.blocks = set(json.loads(self._done.read_text()))
            prefixes = tuple(f"{driver.name(i)}." for i in self.blocks)
            self.weights.written.update(s.name for s in self.specs if s.name.startswith(prefixes))

    @torch.no_grad()
    def write_head(self) -> None:
        """Everything outside the decoder blocks (embeddings, final norm, lm_head)."""
        model = self.driver.model
        tied = tied_names(model)
        weights = self.driver.weights
        stored = weights.stored_dtype if weights is not None else None
        with self.driver.output_head(stored):  # a lazily read lm_head: as stored, not upcast
            for name in state_names(model):
                if name.startswith(self._inside) or name in tied:
                    continue
                tensor = model.get_parameter(name) if _is_param(model, name) else model.get_buffer(name)
                self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        for stored, part in stored_tensors(self.layout, name, tensor).items():
            self.weights.write(stored, part)

    @torch.no_grad()
    def write_block(self, index: int, block: nn.Module) -> None:
        """Block ``index``'s tensors (plain form), and its activation-sparsity tensors if any.
        Leaves the block in its plain form (the walk drops it next)."""

        prefix = self.driver.name(index)
        wrappers = unwrap_all(block)
        found = strip_transform(block)
        for local, tensor in block.state_dict().items():
            self._write(f"{prefix}.{local}", tensor)
        rotations = {f"{prefix}.{name}": m.rotation for name, m in found.items()}
        wrapped = {f"{prefix}.{name}": m for name, m in wrappers.items()}
        tensors = activation_tensors(wrapped, rotations)
        if tensors:

            save_file(tensors, str(self.work / f"activation-{index:05d}.safetensors"))
        self.blocks.add(index)
        tmp = self._done.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(self.blocks)))
        tmp.replace(self._done)

    def finish(self, tokenizer, report: dict, source_folder: Path | None = None) -> dict:
        """Close the weight files, write config, generation config, tokenizer, the merged
        activation file, the model card (:mod:`prune_cli.checkpoint.model_card`), then the report listing
        them all; returns the report as written."""
        files = self.weights.finish()
        model = self.driver.model
        prepare_for_save(model)
        config = model.config
        config.dtype = DTYPE_NAMES_BY_DTYPE.get(self.dtype, str(self.dtype).split(".")[-1])
        config.architectures = [type(model).__name__]
        config.save_pretrained(self.folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        self._merge_activation()

        report["tensors_sha256"] = tensor_digests(self.folder, [f for f in files if f.endswith(".safetensors")])

        drop_loading_leftovers(self.folder)
        write_legacy_rope(self.folder)  # rope_theta & co. for readers of the transformers 4 layout
        source = recorded_source(report)
        facts = source_facts(source)
        make_portable(report, source, facts)  # no path of this machine in the files written
        write_model_card(self.folder, report, facts)
        fix_modes(self.folder)
        report["files"] = file_list(self.folder)
        log.debug("wrote %s", ", ".join(files))
        return write_report(self.folder, report)

    def _merge_activation(self) -> None:
        """Concatenate the per-block activation files into ``activation_sparsity.safetensors``
        (one block's tensors in memory at a time)."""


        parts = sorted(self.work.glob("activation-*.safetensors"))
        if not parts:
            return
        specs = []
        for part in parts:
            with safe_open(str(part), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    specs.append(TensorSpec(key, tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()]))
        out = StreamingCheckpoint(self.work, specs, max_shard_bytes=1 << 62)
        for part in parts:
            with safe_open(str(part), framework="pt") as f:
                for key in f.keys():
                    out.write(key, f.get_tensor(key))
        (written,) = out.finish()
        (self.work / written).replace(self.folder / ACTIVATION_FILE)

