"""The block driver: the one walk over decoder blocks that every stage uses.

Statistics and pruning, OWL's pre-pass and candidate evaluation, activation calibration, the
greedy allocation's Fisher weights and error curves, and perplexity all have the same shape: push
some token windows through the model one decoder block at a time. :class:`BlockDriver` owns that
walk, and three questions the stages never answer themselves:

* **where a block's weights come from.** A *streamed* driver holds the model's structure on the
  meta device and a :class:`~prune_cli.checkpoint.weights.WeightSource`; a block is materialised (a fresh
  copy of its meta template filled from the source, in the compute dtype) when the walk reaches
  it, and dropped when the walk leaves it, so at most one block is in memory (two while the next
  one is read). Everything outside the blocks (embeddings, final norm, ``lm_head``, rotary
  buffers) is loaded once. A *resident* driver wraps a model already in memory (a library
  caller's); its blocks are moved, never dropped.
* **where it runs.** The block on ``device`` and everything else where it lives; the parts
  outside the blocks go to ``device`` only while a stage needs them (capturing block inputs,
  computing logits) and back after. Every move goes through one :class:`Placement`, and every
  moved tensor goes back to the device it came from.
* **what happens after.** ``after_block`` callbacks see each block while it is still in place
  (export of the finished block, the resume checkpoint).

A walk: ``stage.begin(driver)`` (each stage captures or restores its streams), then for every
block ``stage.on_block(index, block)`` in stage order, then ``stage.finish(driver)``. Stages that
modify a block (pruning) come before those that only read it (the compressed evaluation).

Logits of hidden states that have been through every block come from the model's own forward
with the blocks replaced by stand-ins that replay them (:meth:`BlockDriver.head_logits`), so a
model's final norm, ``lm_head`` and anything else after the blocks (e.g. Gemma's logit soft-cap)
run exactly as in ``model(input_ids)``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from prune_cli.calibrators import layerwise
from prune_cli.calibrators.layerwise import BlockBatch
from prune_cli.calibrators.spill import SpilledBatch, spill, value
from prune_cli.checkpoint.model_state import materialize, source_name, state_names, stored_names, tied_names
from prune_cli.checkpoint.resume import ResumeState
from prune_cli.checkpoint.weights import WeightSource
from prune_cli.core import stopping
from prune_cli.core.memory import process_freed_memory
from prune_cli.model.structure import decoder_blocks

log = logging.getLogger(__name__)


class Placement:
    """Moves the tensors of model parts between devices and back: the only code that does.

    :meth:`move` returns a token; :meth:`restore` puts every tensor it moved back on the device
    it came from. Parameters keep their identity (``param.data`` is replaced), so tied weights
    stay tied."""

    def move(self, module: nn.Module, device: torch.device, exclude: Iterable[nn.Module] = ()) -> list:
        skip = {id(m) for root in exclude for m in root.modules()}
        moved = []
        for owner in module.modules():
            if id(owner) in skip:
                continue
            for key, param in owner._parameters.items():
                if param is not None and param.device != device and param.device.type != "meta":
                    moved.append((owner, "param", key, param.device))
                    param.data = param.data.to(device)
            for key, buf in owner._buffers.items():
                if buf is not None and buf.device != device and buf.device.type != "meta":
                    moved.append((owner, "buffer", key, buf.device))
                    owner._buffers[key] = buf.to(device)
        self.moved(module, device, len(moved))
        return moved

    def restore(self, token: list) -> None:
        for owner, kind, key, home in reversed(token):
            if kind == "param":
                param = owner._parameters[key]
                param.data = param.data.to(home)
            else:
                owner._buffers[key] = owner._buffers[key].to(home)

    def drop(self, token: list) -> None:
        """The tensors of ``token`` are being dropped where they are (a streamed block the walk
        is done with): nothing to move back."""

    def moved(self, module: nn.Module, device: torch.device, count: int) -> None:
        """Hook for tests (a recording placement); called after every :meth:`move`."""


class Stage:
    """One piece of per-block work in a walk (see the module docstring)."""

    def begin(self, driver: BlockDriver) -> None:
        """Before the first block: capture (or restore) this stage's streams."""

    def on_block(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is in place on the driver's device."""

    def finish(self, driver: BlockDriver) -> None:
        """After the last block."""

    def state_dict(self) -> dict:
        """What :meth:`load_state_dict` needs to continue this stage (mid-walk) or to stand for
        its finished walk (after :meth:`finish`); tensors may appear anywhere in it. A stage
        that cannot be resumed raises."""
        raise NotImplementedError(f"{type(self).__name__} cannot be resumed")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be resumed")


class HiddenStage(Stage):
    """A stage that carries its own stream of hidden states through the walk: :meth:`begin`
    captures the first block's inputs of ``windows`` in batches of ``batch_size``
    (:attr:`batches`, which the stage pushes through each block), :meth:`finish` lets them go.

    The resume code of such stages lives here once: :meth:`state_dict` is ``{"hidden": [...],
    **self.extra_state()}`` (the hidden states first, then the stage's own results, in that
    order), and :meth:`load_state_dict` puts the hidden states back into a walk in progress
    (:func:`restore_hidden`; for a finished walk, whose streams were let go, :meth:`restore_finished`
    decides) and hands the rest to :meth:`load_extra_state`."""

    def __init__(self, windows: torch.Tensor, batch_size: int):
        self.windows = windows
        self.batch_size = batch_size
        self.batches: list[BlockBatch] = []

    def begin(self, driver: BlockDriver) -> None:
        self.driver = driver
        self.batches = driver.capture(self.windows, self.batch_size)

    def finish(self, driver: BlockDriver) -> None:
        self.batches = []

    def extra_state(self) -> dict:
        """The stage's own resume state besides the hidden states (key order is kept)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Put back what :meth:`extra_state` returned (``state`` also holds ``"hidden"``)."""

    def restore_finished(self, hidden: list) -> None:
        """The hidden states of a finished walk (kept by a stage whose :meth:`finish` keeps
        them); by default there are none to put back."""

    def state_dict(self) -> dict:
        return {"hidden": [b.held() for b in self.batches], **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.batches:
            restore_hidden(self.batches, state["hidden"])
        else:
            self.restore_finished(state["hidden"])
        self.load_extra_state(state)


def restore_hidden(batches: list[BlockBatch], hidden: list[torch.Tensor]) -> None:
    """Put saved hidden states back into freshly captured ``batches`` (their other inputs, e.g.
    rotary embeddings and masks, are the capture's own)."""

    if len(hidden) != len(batches):
        raise RuntimeError(f"resume state holds {len(hidden)} batches, the capture made {len(batches)}")
    for batch, h in zip(batches, hidden, strict=False):
        batch.hidden = h if isinstance(batch, SpilledBatch) else value(h)


_CHUNK = 1 << 22  # elements rounded at a time by rounded_head


class _Replay(nn.Module):
    """Stands in for decoder block ``index`` in :meth:`BlockDriver.head_logits`: passes the hidden
    states on, and the last one returns the stored output of the real last block instead."""

    def __init__(self, driver: BlockDriver, last: bool):
        super().__init__()
        self._driver = driver
        self._last = last

    def forward(self, hidden_states, *args, **kwargs):
        out = self._driver._replayed if self._last else hidden_states
        return (out,) if self._driver.tuple_output else out


@torch.no_grad()
def _round_in_place(tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """``tensor``'s values as ``dtype`` holds them, written back in place a chunk at a time."""
    for part in tensor.data.view(-1).split(_CHUNK):
        part.copy_(part.to(dtype))


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    """``module``'s name in ``model`` (by identity), or ``None``."""
    return next((n for n, m in model.named_modules() if m is module), None)


def narrow_input(model: nn.Module, tied: dict[str, str], stored: torch.dtype, compute: torch.dtype):
    """``(name, module)`` of the input embedding a streamed run keeps in the checkpoint's narrower
    ``stored`` dtype (bfloat16 / float16) while blocks compute in float32, else ``None``: a
    plain, untied ``nn.Embedding`` only, whose lookup upcast afterwards is exactly the float32
    lookup (a subclass may compute on the weight, e.g. Gemma's scaling; a tied one is also the
    ``lm_head``'s matrix). Half the memory of the largest tensor outside the blocks.
    ``tied``: :func:`~prune_cli.checkpoint.model_state.tied_names` of ``model``."""
    if stored not in (torch.bfloat16, torch.float16) or compute != torch.float32:
        return None
    get = getattr(model, "get_input_embeddings", None)
    module = get() if get is not None else None
    if type(module) is not nn.Embedding:
        return None
    name = _module_name(model, module)
    if not name or f"{name}.weight" in tied or f"{name}.weight" in tied.values():
        return None
    return name, module


def untied_output(model: nn.Module, tied: dict[str, str], inside: str) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of ``model``'s output embedding when it shares no tensor with anything
    (untied) and lies outside the blocks (``inside``: their path and a dot), else ``None``: what
    a streamed run reads only when the head is used (:meth:`BlockDriver.load_head`)."""
    get = getattr(model, "get_output_embeddings", None)
    module = get() if get is not None else None
    if module is None:
        return None
    name = _module_name(model, module)
    if not name or name.startswith(inside):
        return None
    own = {f"{name}.{local}" for local in state_names(module)}
    if not own or own & (set(tied) | set(tied.values())):
        return None
    return name, module


class BlockDriver:
    """Walks the decoder blocks of ``model`` on ``device`` (see the module docstring).

    ``weights``: None for a resident model (its blocks hold real tensors), else the source its
    meta blocks are filled from, in ``dtype``. ``prepare_block(index, block)`` callbacks run on
    every block once it is in place (e.g. installing a checkpoint's activation sparsifiers)."""

    def __init__(
        self, model: nn.Module, device: torch.device | str = "cpu", weights: WeightSource | None = None,
        dtype: torch.dtype | None = None, placement: Placement | None = None,
    ):
        self.model = model
        self.found = decoder_blocks(model)
        self.device = torch.device(device)
        self.weights = weights
        self.placement = placement or Placement()
        self.base_prefix = getattr(model, "base_model_prefix", "") or ""
        self.prepare_block: list[Callable[[int, nn.Module], None]] = []
        self.tuple_output = False
        self._replayed: torch.Tensor | None = None
        self.resume: ResumeState | None = None  # walks keep and resume their state
        self.spill_folder: Path | None = None  # a folder: captured hidden states are kept there, not in memory
        self._walks = 0
        self.lazy_output: tuple[str, nn.Module] | None = None  # (name, module): read on use (load_head)
        self.narrow_input: nn.Module | None = None  # the input embedding kept in its stored dtype (load_head)
        self._head_rounding: torch.dtype | None = None  # set inside rounded_head
        self.freed_memory = process_freed_memory()  # under a tight memory limit, freed memory goes back after each block
        self.templates: list[nn.Module] | None  # the blocks' meta templates when streamed
        if weights is not None:
            self.templates = list(self.found.modules)
            self.dtype = dtype or torch.float32
        else:
            self.templates = None
            self.dtype = dtype or next(model.parameters()).dtype

    # ------------------------------------------------------------------ structure

    @property
    def streamed(self) -> bool:
        return self.weights is not None

    @property
    def n_blocks(self) -> int:
        return len(self.found)

    @property
    def path(self) -> str:
        return self.found.path

    def name(self, index: int) -> str:
        return f"{self.found.path}.{index}"

    def template(self, index: int) -> nn.Module:
        """Block ``index`` as structure (its meta template when streamed, else the block)."""
        return self.templates[index] if self.templates is not None else self.found.modules[index]

    def load_head(self) -> list[str]:
        """Streamed: fill everything outside the blocks from the source (on the CPU, compute
        dtype) and tie what the model ties. Returns the names filled.

        An untied output embedding (``lm_head``) is not among them: it is read when the head is
        used (:meth:`head_on_device`) and dropped after, so no walk holds it while a block is in
        memory. It is the largest tensor outside the blocks (vocabulary x hidden: 0.4 GB in
        float32 for a 49k vocabulary at hidden 2048), and only the evaluations and the Fisher
        weights use it, once per walk, after the blocks."""
        assert self.weights is not None
        tied = tied_names(self.model)
        inside = self.found.path + "."
        skip = [n for n in state_names(self.model) if n.startswith(inside)] + list(tied)
        self.lazy_output = untied_output(self.model, tied, inside)
        if self.lazy_output is not None:
            name, module = self.lazy_output
            skip += [f"{name}.{local}" for local in state_names(module)]
        stored = self.weights.stored_dtype
        narrow = narrow_input(self.model, tied, stored, self.dtype) if stored is not None else None
        if narrow is not None:
            skip.append(f"{narrow[0]}.weight")
        filled = materialize(self.model, "", self.weights, self.dtype, torch.device("cpu"), self.base_prefix, skip=skip)
        if narrow is not None:
            name, module = narrow
            assert stored is not None  # narrow_input needs a stored dtype
            filled += [f"{name}.{n}" for n in materialize(module, name, self.weights, stored, torch.device("cpu"), self.base_prefix)]
            compute = self.dtype
            module.register_forward_hook(lambda _m, _args, out: out.to(compute))
            self.narrow_input = module
        for later, first in tied.items():
            if not later.startswith(inside):
                owner, _, leaf = later.rpartition(".")
                self.model.get_submodule(owner)._parameters[leaf] = self.model.get_parameter(first)
        return filled

    @contextlib.contextmanager
    def output_head(self, dtype: torch.dtype | None = None):
        """The lazily read output embedding (:meth:`load_head`) in memory for the duration, in
        ``dtype`` (default: the compute dtype; rounded as :meth:`rounded_head` says while it is
        in effect), then dropped again. Nothing to do when it is resident or already read."""
        lazy = self.lazy_output
        if lazy is None or not any(t.device.type == "meta" for t in lazy[1].parameters()):
            yield
            return
        assert self.weights is not None  # only a streamed driver reads lazily
        name, module = lazy
        materialize(module, name, self.weights, dtype or self.dtype, torch.device("cpu"), self.base_prefix)
        if self._head_rounding is not None and dtype is None:
            for tensor in module.parameters():
                if tensor.is_floating_point() and tensor.dtype != self._head_rounding:
                    _round_in_place(tensor, self._head_rounding)
        try:
            yield
        finally:
            module.to("meta")

    # ------------------------------------------------------------------ placement

    @contextlib.contextmanager
    def head_on_device(self, output: bool = True):
        """Everything outside the blocks on the device for the duration, then back; with
        ``output=False`` without a lazily read output embedding (the embedding lookup alone)."""
        with self.output_head() if output else contextlib.nullcontext():
            token = self.placement.move(self.model, self.device, exclude=[self.found.modules])
            try:
                yield
            finally:
                self.placement.restore(token)

    @contextlib.contextmanager
    def rounded_head(self, dtype: torch.dtype | None):
        """Everything outside the blocks rounded to ``dtype`` for the duration (its values as an
        export in ``dtype`` holds them; ``None``: unchanged), then restored exactly."""
        if dtype is None:
            yield
            return
        previous, self._head_rounding = self._head_rounding, dtype
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its own data)
        saved = []  # (tensor, its original): clones in memory, or (streamed) names to read back
        inside = self.found.path + "."
        with torch.no_grad():
            for name in state_names(self.model):  # what an export holds: not e.g. rotary buffers
                if name.startswith(inside):
                    continue
                owner, _, leaf = name.rpartition(".")
                holder = self.model.get_submodule(owner) if owner else self.model
                tensor: torch.Tensor | None = holder._parameters.get(leaf)
                tensor = holder._buffers.get(leaf) if tensor is None else tensor
                assert tensor is not None  # state_names lists only parameters and buffers that are set
                if tensor.device.type == "meta":  # the lazy output embedding: rounded when it is read
                    continue
                if self.narrow_input is not None and tensor is self.narrow_input.weight:
                    # kept in its stored dtype (load_head): a wider dtype holds its values already;
                    # a narrower other one gets a tensor of its own, in that dtype, for the duration
                    if dtype != tensor.dtype and dtype in (torch.bfloat16, torch.float16):
                        swapped.append((tensor, tensor.data))
                        tensor.data = tensor.data.to(dtype)
                elif tensor.is_floating_point() and tensor.dtype != dtype:
                    # streamed: the original is read back from the checkpoint (no second copy)
                    saved.append((tensor, name if self.weights is not None else tensor.detach().clone()))
                    _round_in_place(tensor, dtype)
        try:
            yield
        finally:
            self._head_rounding = previous
            for tensor, data in swapped:
                tensor.data = data
            with torch.no_grad():
                for tensor, original in saved:
                    if isinstance(original, str):
                        assert self.weights is not None  # names were saved only when streamed
                        found = source_name(self.weights, original, self.base_prefix)
                        if found is None:  # a head tensor the source lacks: the source's lookup error, as before
                            raise KeyError(found)
                        original = self.weights.read([found])[found]
                    tensor.data.copy_(original)

    def _note_output(self, module, args, output) -> None:
        self.tuple_output = isinstance(output, (tuple, list))

    @contextlib.contextmanager
    def block(self, index: int):
        """Block ``index`` in place on the device for the duration: materialised from the source
        (streamed) or moved there (resident); dropped, or moved back, after."""
        if self.templates is not None:
            assert self.weights is not None  # templates exist only when streamed
            block = copy.deepcopy(self.templates[index])
            materialize(block, self.name(index), self.weights, self.dtype, torch.device("cpu"), self.base_prefix)
            token = self.placement.move(block, self.device)
            self.found.modules[index] = block
        else:
            block = self.found.modules[index]
            token = self.placement.move(block, self.device)
        layerwise.register_block(block, index, self.name(index))
        handle = block.register_forward_hook(self._note_output)
        try:
            for prepare in self.prepare_block:
                prepare(index, block)
            yield block
        finally:
            handle.remove()
            if self.templates is not None:
                self.found.modules[index] = self.templates[index]
                self.placement.drop(token)
            else:
                self.placement.restore(token)

    def read_ahead(self, index: int) -> int:
        """Ask the source to start reading block ``index``'s tensors (streamed runs; a no-op
        otherwise): called once the walk holds the block before it, so the disk works while
        that block computes. The bytes go to the page cache, not into this process, so the
        peak memory is unchanged; returns the bytes asked for."""
        if self.templates is None or self.weights is None:
            return 0
        names = stored_names(self.templates[index], self.name(index), self.weights, self.base_prefix)
        return self.weights.prefetch(names)

    # ------------------------------------------------------------------ streams

    def capture(self, windows: torch.Tensor, batch_size: int) -> list[BlockBatch]:
        """The first block's inputs for ``windows`` (``(n, seqlen)`` ids) in batches, on the device
        (in files of :attr:`spill_folder` when it is set)."""
        keep = None
        if self.spill_folder is not None:

            keep = lambda batch: spill(batch, self.spill_folder)  # noqa: E731
        with self.head_on_device(output=False):
            return layerwise.capture_block_inputs(self.model, self.found.modules, windows, batch_size, self.device, keep)

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, seqlen, vocab)`` of the last block's outputs ``hidden`` for the windows
        ``ids`` (see the module docstring). Call inside :meth:`head_on_device`."""
        return self._replay_forward(hidden, ids).logits

    def _replay_forward(self, hidden: torch.Tensor, ids: torch.Tensor, **kwargs):
        blocks = self.found.modules
        originals = list(blocks)
        n = len(originals)
        try:
            for i in range(n):
                blocks[i] = _Replay(self, last=i == n - 1)
            self._replayed = hidden
            return self.model(input_ids=ids.to(self.device), use_cache=False, **kwargs)
        finally:
            self._replayed = None
            for i, original in enumerate(originals):
                blocks[i] = original

    def head_loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The model's own mean next-token loss of ``ids`` (``labels=ids``) from the last block's
        outputs ``hidden``, differentiable with respect to ``hidden``. Inside :meth:`head_on_device`."""
        return self._replay_forward(hidden, ids, labels=ids.to(self.device)).loss

    # ------------------------------------------------------------------ walks

    def walk(
        self, stages: Sequence[Stage], blocks: Iterable[int] | None = None,
        after_block: Sequence[Callable[[int, nn.Module], None]] = (), progress: Callable[[int], None] | None = None,
        prepare: Callable[[int, nn.Module], None] | None = None, timings=None, after_key: str = "export",
    ) -> None:
        """One walk over ``blocks`` (default: all, in order) running ``stages`` (see the module
        docstring). ``prepare(index, block)`` runs on each block before the stages (e.g. WINA's
        transform), ``after_block`` callbacks after them (export); ``progress(index)`` once the
        block is gone. ``timings`` (:class:`~prune_cli.core.records.Timings`) gets each stage's time
        under its ``timing_key``, reading blocks under ``read`` and the callbacks under ``after_key``.

        With :attr:`resume` set (a :class:`~prune_cli.checkpoint.resume.ResumeState`), walks are numbered in
        the order they run: a walk the interrupted run finished is skipped (its stages get their
        results back), the one it was in continues at its next block, and the state is kept
        after blocks; a deferred stop request (:mod:`prune_cli.core.stopping`) ends the walk after
        the block it arrived in, once the state is written."""

        walk_id = self._walks
        self._walks += 1
        order = list(range(self.n_blocks) if blocks is None else blocks)
        resume = self.resume
        if resume is not None:
            done = resume.finished_states(walk_id)
            if done is not None:
                for stage, state in zip(stages, done, strict=False):
                    stage.load_state_dict(state)
                for index in order:
                    if progress is not None:
                        progress(index)
                return
        clock = _Clock(timings)
        if self.streamed:
            self.freed_memory.after_block()  # what loading and the last walk left behind
        for stage in stages:
            with clock(stage):
                stage.begin(self)
        start = 0
        if resume is not None and (current := resume.current_states(walk_id)) is not None:
            start, states = current
            for stage, state in zip(stages, states, strict=False):
                stage.load_state_dict(state)
            for index in order[:start]:
                if progress is not None:
                    progress(index)
            log.info("resuming walk %d at block %d/%d", walk_id + 1, start + 1, len(order))
        with stopping.deferring() if resume is not None else contextlib.nullcontext():
            for position in range(start, len(order)):
                index = order[position]
                with clock("read"):
                    entered = self.block(index)
                    block = entered.__enter__()
                    if position + 1 < len(order):
                        self.read_ahead(order[position + 1])
                try:
                    if prepare is not None:
                        prepare(index, block)
                    for stage in stages:
                        with clock(stage):
                            stage.on_block(index, block)
                    for callback in after_block:
                        with clock(after_key):
                            callback(index, block)
                except BaseException:
                    entered.__exit__(None, None, None)
                    raise
                entered.__exit__(None, None, None)
                if self.streamed:
                    del block  # its tensors are free now: under a tight limit, hand them back
                    self.freed_memory.after_block()
                if resume is not None and position + 1 < len(order):
                    with clock("resume"):
                        resume.block_done(walk_id, position + 1, stages, force=stopping.pending())
                if progress is not None:
                    progress(index)
                if position + 1 < len(order):
                    stopping.check()
            for stage in stages:
                with clock(stage):
                    stage.finish(self)
            if resume is not None:
                with clock("resume"):
                    resume.walk_done(walk_id, stages)
        stopping.check()


class _Clock:
    """Adds the seconds spent in a stage (by its ``timing_key``) or a named step to ``timings``."""

    def __init__(self, timings):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, what):
        if self.timings is None:
            yield
            return
        key = what if isinstance(what, str) else getattr(what, "timing_key", None)
        start = time.perf_counter()
        try:
            yield
        finally:
            if key:
                self.timings.add(key, time.perf_counter() - start)


def as_driver(model_or_driver, device: torch.device | str = "cpu") -> BlockDriver:
    """``model_or_driver`` if it is a driver, else a resident driver over the model on ``device``."""
    if isinstance(model_or_driver, BlockDriver):
        return model_or_driver
    return BlockDriver(model_or_driver, device)
