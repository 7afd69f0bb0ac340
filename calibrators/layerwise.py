"""The layer-wise calibrator: streams calibration activations one decoder block at a time.

1. :func:`capture_block_inputs` runs the model with every decoder block replaced by a recorder,
   keeping the first block's hidden states and ALL the keyword arguments each block is called
   with (rotary ``position_embeddings``, masks, positions). Blocks may differ in them: Gemma 3
   (and Gemma 2, Qwen2 with ``max_window_layers``, GPT-OSS) give sliding-window layers another
   mask and rotary embedding than global ones; a batch keeps block 0's keyword arguments and,
   per block, the ones that differ (:attr:`BlockBatch.layer_kwargs`), and every block is
   called with its own (:meth:`BlockBatch.inputs`).
2. Per block, :func:`collect_input_stats` runs the calibration batches through it with hooks
   on the target Linears, accumulating only the requested statistics, once per shared input
   (q/k/v read the same tensor, so do gate/up).
3. After pruning, :func:`propagate` runs the batches through the pruned block; its outputs
   become the next block's inputs.

Activation sparsity samples the Linears' inputs instead (:func:`collect_inputs`, and
:func:`collect_first_input` for one stage at a time, stopping the block's forward at the next
stage).

Peak memory is the model plus one block's activations for the calibration windows.

Non-finite activations raise :class:`~prune_cli.core.errors.NonFiniteError` where they first
appear, naming the block: the captured inputs of block 0, every block's outputs when they
replace the hidden states (:func:`propagate`, ``update_hidden=True``), the sampled Linear
inputs, and the finished statistics (:meth:`InputStats.check_finite`, naming the Linears). Each
check is one reduction per tensor and one host sync per block pass, not per batch. Blocks are
named by the callers (``name="model.layers.5"``) or else by :func:`capture_block_inputs`, which
remembers the names of the blocks it was given.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core import distributed
from prune_cli.core.errors import NonFiniteError
from prune_cli.core.finite import (
    WEIGHTS_HINT,
    all_finite,
    check_finite_parameters,
    check_finite_tensor,
    describe_nonfinite,
)

# Block -> its full name (e.g. ``model.layers.5``) and index, recorded by capture_block_inputs
# and by register_block (the block driver, for each block it materialises).
_BLOCK_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_BLOCK_INDEX: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def register_block(block: nn.Module, index: int, name: str | None = None) -> None:
    """Record that ``block`` is decoder block ``index`` (named ``name``): it gets that block's
    own keyword arguments from :meth:`BlockBatch.inputs`."""
    _BLOCK_INDEX[block] = index
    if name:
        _BLOCK_NAMES[block] = name

CHANGED_WEIGHTS_HINT = (
    "prune-cli checks the weights when it loads a model, so the step that changed this block "
    "(pruning) made them non-finite; if the model was not loaded by prune-cli: " + WEIGHTS_HINT
)


def _known_name(block: nn.Module, name: str | None) -> str:
    """``name`` if given, else the name :func:`capture_block_inputs` recorded, else ``""``."""
    return name or _BLOCK_NAMES.get(block, "")


def block_name(block: nn.Module, name: str | None = None) -> str:
    """``block``'s full name (see :func:`_known_name`), else a description by type."""
    return _known_name(block, name) or f"a decoder block ({type(block).__name__})"


def _overflow_hint(dtype: torch.dtype) -> str:
    """The hint for non-finite activations computed from finite weights in ``dtype``."""
    if dtype == torch.float16:
        return "the weights are finite, so the activations overflowed float16 (above 65504): rerun with --dtype float32"
    if dtype == torch.bfloat16:
        return "the weights are finite, so the activations overflowed bfloat16: rerun with --dtype float32"
    return "the weights are finite but the activations exceed float32's range: the checkpoint's weights are likely mis-scaled"


def check_block_outputs(block: nn.Module, batches: list[BlockBatch], name: str | None = None,
                        what: str = "calibration activations") -> None:
    """Raise :class:`NonFiniteError` unless the hidden states of ``batches`` (just computed by
    ``block``) are all finite: naming a non-finite parameter of the block if there is one
    (pruning changed it), else the block. One host sync. (The block's inputs are gone by now,
    replaced to keep one block's activations in memory, so the submodule is not searched.)
    Batches are read one at a time (spilled batches are never all in memory)."""
    if all_finite(b.hidden for b in batches):
        return
    check_finite_parameters(block, prefix=_known_name(block, name), hint=CHANGED_WEIGHTS_HINT)
    raise NonFiniteError(
        f"non-finite {what} at the output of {block_name(block, name)}: {describe_nonfinite(b.hidden for b in batches)}",
        hint=_overflow_hint(batches[0].dtype),
    )


def _same(a, b) -> bool:
    """Whether two keyword-argument values are the same object (tensors, or tuples of them such
    as ``(cos, sin)``) or equal plain values."""
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain comparison
        return False


class _Recorder(nn.Module):
    """Stands in for decoder block ``index`` while the inputs are captured: records what the
    block is called with and passes the hidden states on; the last one stops the forward."""

    def __init__(self, index: int, last: bool, seen: list):
        super().__init__()
        self.index, self.last, self.seen = index, last, seen

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.seen.append((self.index, hidden, rest, kwargs))
        if self.last:
            raise _StopAtFirstBlock
        return hidden


class _StopAtFirstBlock(Exception):
    """Private: raised by the capture hook to stop the model's forward at block 0."""


class _InputsSeen(Exception):
    """Private: raised once every wanted Linear input of a block has been seen, so a
    statistics pass skips the rest of the block (e.g. the down_proj product)."""


class _SharedInputs:
    """Within one batch: which Linears read the very same input tensor (q/k/v, gate/up). Each
    tensor is held until :meth:`clear`, so its ``id`` cannot be reused by another tensor."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def add(self, x: torch.Tensor, name: str) -> str | None:
        """Record that ``name`` reads ``x``; returns the first reader of ``x`` in this batch, or
        None when ``name`` is the first (it leads the group)."""
        hit = self._seen.get(id(x))
        if hit is not None and hit[0] is x:
            hit[1].append(name)
            return hit[1][0]
        self._seen[id(x)] = (x, [name])
        return None

    def readers(self, x: torch.Tensor) -> list[str]:
        return self._seen[id(x)][1]

    def clear(self) -> None:
        self._seen.clear()


@dataclass
class BlockBatch:
    """One batch of block inputs: ``hidden`` is ``(batch, seqlen, hidden_size)``. (A
    :class:`~prune_cli.calibrators.spill.SpilledBatch` keeps ``hidden`` in a file.)"""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict  # block 0's keyword arguments
    layer_kwargs: dict = None  # block index -> the keyword arguments that differ from block 0's

    def inputs(self, block: nn.Module) -> tuple[tuple, dict]:
        """``(args, kwargs)`` to call ``block`` with besides the hidden states: block 0's, with
        the block's own values where they differ (a sliding-window layer's mask and rotary
        embedding). A block not registered (:func:`register_block`) gets block 0's."""
        extra = (self.layer_kwargs or {}).get(_BLOCK_INDEX.get(block))
        return self.args, ({**self.kwargs, **extra} if extra else self.kwargs)

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def held(self):
        """The current hidden states, kept as they are by later assignments."""
        return self.hidden

    def copy(self) -> BlockBatch:
        return replace(self)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int, device: torch.device,
    keep: Callable[[BlockBatch], BlockBatch] | None = None,
) -> list[BlockBatch]:
    """Inputs of ``blocks[0]`` for ``windows`` (``(n, seqlen)`` token ids), in batches, with
    every block's own keyword arguments (see the module docstring). The blocks are replaced by
    recorders for the forward (and put back), so none of them runs and none needs its weights.
    Records the blocks' names (:func:`block_name`); raises :class:`NonFiniteError` when the
    inputs are not finite. Moves nothing: the parts of the model before the first block must be
    on ``device`` already (the :class:`~prune_cli.streaming.driver.BlockDriver` places them). ``keep``
    turns each batch, as soon as it is captured, into what is kept (e.g. a spilled batch)."""
    path = next((n for n, m in model.named_modules() if m is blocks), None)
    for index, block in enumerate(blocks):
        register_block(block, index, f"{path}.{index}" if path else None)
    captured: list[BlockBatch] = []
    originals = list(blocks)
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            seen: list = []
            for index in range(len(originals)):
                blocks[index] = _Recorder(index, index == len(originals) - 1, seen)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopAtFirstBlock:
                pass
            else:
                raise RuntimeError("the last decoder block was never called")
            if [entry[0] for entry in seen] != list(range(len(originals))):
                raise RuntimeError(f"the decoder blocks were called in the order {[e[0] for e in seen]}")
            _, hidden, rest, kwargs = seen[0]
            layer_kwargs = {}
            for index, _, _, own in seen[1:]:
                differ = {k: v for k, v in own.items() if k not in kwargs or not _same(v, kwargs[k])}
                if differ:
                    layer_kwargs[index] = differ
            batch = BlockBatch(hidden.detach(), rest, kwargs, layer_kwargs)
            captured.append(keep(batch) if keep is not None else batch)
    finally:
        for index, original in enumerate(originals):
            blocks[index] = original
    if not all_finite(b.hidden for b in captured):
        check_finite_parameters(model)  # weights not checked at load (a library caller)
        first = block_name(blocks[0])
        raise NonFiniteError(
            f"non-finite calibration activations at the input of {first} (the embeddings' output): "
            f"{describe_nonfinite(b.hidden for b in captured)}",
            hint=_overflow_hint(captured[0].dtype),
        )
    return captured


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def propagate(block: nn.Module, batches: list[BlockBatch], name: str | None = None, check: bool = True,
              what: str = "calibration activations") -> None:
    """Run every batch through ``block`` and replace its hidden states by the outputs.
    ``name`` (e.g. ``model.layers.5``) names the block when the outputs are not finite
    (:class:`NonFiniteError`); by default the name :func:`capture_block_inputs` recorded.
    ``check=False``: non-finite outputs are passed on (a compressed model's evaluation); ``what``
    names the activations in the error."""
    for batch in batches:
        args, kwargs = batch.inputs(block)
        batch.hidden = _block_output(block(batch.hidden, *args, **kwargs))
    if check:
        check_block_outputs(block, batches, name, what)


@torch.no_grad()
def collect_input_stats(
    block: nn.Module,
    batches: list[BlockBatch],
    linears: dict[str, nn.Linear],
    wanted: dict[str, frozenset[Stat]],
    update_hidden: bool = False,
    backend=None,
    name: str | None = None,
) -> dict[str, InputStats]:
    """Statistics of the inputs of ``linears`` (names relative to ``block``) over all batches.

    Linears that read the very same input tensor share one :class:`InputStats` (computed
    once); the wanted statistics of a shared input are the union of its readers' wants.
    Returns a mapping from Linear name to its (possibly shared) statistics. With
    ``update_hidden`` the block's outputs replace the batches' hidden states (statistics and
    propagation in one pass, for passes that do not change the block); without it, the
    forward stops as soon as the last wanted input has been seen.

    Every finished statistic is checked (:meth:`InputStats.check_finite`, naming its Linears by
    full name: ``name`` or the recorded block name), then the updated hidden states
    (:func:`check_block_outputs`).
    """
    label = _known_name(block, name)
    wanted = {local: w for local, w in wanted.items() if w}
    if not wanted:
        if update_hidden:
            propagate(block, batches, name)
        return {}
    shared = _SharedInputs()
    readers: dict[str, tuple[str, ...]] = {}  # leader name -> names sharing its input (first batch)
    pending: list[tuple[str, torch.Tensor]] = []

    called: set[str] = set()

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            if shared.add(x, name) is None:
                pending.append((name, x))
            called.add(name)
            if not update_hidden and len(called) == len(wanted):
                raise _InputsSeen

        return hook

    handles = [linears[name].register_forward_pre_hook(make_hook(name)) for name in wanted]
    groups: dict[str, InputStats] = {}
    by_name: dict[str, InputStats] = {}
    try:
        for batch in batches:
            called.clear()
            hidden = batch.hidden
            args, kwargs = batch.inputs(block)
            try:
                output = block(hidden, *args, **kwargs)
            except _InputsSeen:
                output = None
            for leader, x in pending:
                names = shared.readers(x)
                if leader not in groups:
                    union = frozenset().union(*(wanted[n] for n in names))
                    groups[leader] = InputStats(
                        x.shape[-1], union, consumers=list(names), tokens_per_window=hidden.shape[1], block=label
                    )
                    readers[leader] = tuple(names)
                    for n in names:
                        by_name[n] = groups[leader]
                elif tuple(names) != readers[leader]:
                    raise RuntimeError(f"input sharing of {leader} changed between batches")
                groups[leader].update(x, backend)
            pending.clear()
            shared.clear()
            if update_hidden:
                batch.hidden = _block_output(output)
    finally:
        for handle in handles:
            handle.remove()

    for stats in groups.values():
        distributed.sum_stats(stats)  # data-parallel ranks: every rank gets the sums over all
        stats.check_finite()
    if update_hidden:
        check_block_outputs(block, batches, name)
    return by_name


@torch.no_grad()
def collect_inputs(
    block: nn.Module,
    batches: list[BlockBatch],
    linears: dict[str, nn.Linear],
    max_tokens: int,
    generator: torch.Generator,
    update_hidden: bool = False,
    name: str | None = None,
) -> dict[str, torch.Tensor]:
    """The input activations of ``linears`` as fp32 ``(n_tokens, in_features)`` matrices, a
    reproducible random subset of at most ``max_tokens`` tokens (the same tokens for every
    Linear of the block). Linears reading the same tensor share one matrix. Non-finite
    samples or (with ``update_hidden``) outputs raise :class:`NonFiniteError` (``name``: the
    block's, as for :func:`propagate`)."""
    sample = _TokenSample(batches, max_tokens, generator)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    shared: dict[str, str] = {}  # reader -> the first reader of the same input
    for index, batch in enumerate(batches):
        same = _SharedInputs()

        def make_hook(name: str):
            def hook(module, args):
                x = args[0]
                leader = same.add(x, name)
                if leader is not None:
                    shared[name] = leader
                    return
                parts[name].append(sample.rows(x, index))

            return hook

        handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]
        args, kwargs = batch.inputs(block)
        try:
            output = block(batch.hidden, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if update_hidden:
            batch.hidden = _block_output(output)
    result = {local: torch.cat(chunks) for local, chunks in parts.items() if chunks}
    for local, matrix in result.items():
        readers = [local, *(r for r, leader in shared.items() if leader == local)]
        _check_sample(matrix, block, name, readers, batches[0].dtype)
    if update_hidden:
        check_block_outputs(block, batches, name)
    for local, leader in shared.items():
        result.setdefault(local, result[leader])
    return result


def _check_sample(x: torch.Tensor, block: nn.Module, name: str | None, readers: list[str], dtype: torch.dtype) -> None:
    """Sampled Linear inputs ``x`` (``readers`` read them; ``dtype``: the block's) must be finite."""
    label = _known_name(block, name)
    full = ", ".join(f"{label}.{r}" if label else r for r in readers)
    check_finite_tensor(x, f"the calibration inputs of {full}", hint=_overflow_hint(dtype))


@torch.no_grad()
def collect_first_input(
    block: nn.Module, batches: list[BlockBatch], linears: dict[str, nn.Linear], max_tokens: int,
    generator: torch.Generator, name: str | None = None,
) -> tuple[list[str], torch.Tensor | None]:
    """The first input the block's forward hands to any of ``linears``, as an fp32
    ``(n_tokens, in_features)`` matrix over the same token sample :func:`collect_inputs` draws,
    and the names of the Linears that read that very tensor, in call order (q/k/v, gate/up).
    Each batch's forward stops at the first of ``linears`` that reads another tensor, so the
    rest of the block is not computed. ``([], None)`` when the forward calls none of them.
    A non-finite sample raises :class:`NonFiniteError` naming the readers (``name``: the
    block's, as for :func:`propagate`)."""
    sample = _TokenSample(batches, max_tokens, generator)
    parts: list[torch.Tensor] = []
    names: list[str] = []
    for index, batch in enumerate(batches):
        seen: dict = {"x": None, "readers": []}

        def make_hook(name: str):
            def hook(module, args):
                x = args[0]
                if seen["x"] is None:
                    seen["x"] = x
                elif x is not seen["x"]:
                    raise _InputsSeen
                seen["readers"].append(name)

            return hook

        handles = [linear.register_forward_pre_hook(make_hook(name)) for name, linear in linears.items()]
        args, kwargs = batch.inputs(block)
        try:
            block(batch.hidden, *args, **kwargs)
        except _InputsSeen:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if index == 0:
            names = seen["readers"]
        elif seen["readers"] != names:
            raise RuntimeError(f"the block's Linears read their inputs in another order in batch {index}: "
                               f"{seen['readers']} instead of {names}")
        if seen["x"] is not None:
            parts.append(sample.rows(seen["x"], index))
    x = torch.cat(parts) if parts else None
    if x is not None:
        _check_sample(x, block, name, names, batches[0].dtype)
    return names, x


class _TokenSample:
    """A reproducible random subset of at most ``max_tokens`` of the batches' tokens (all of them
    when there are no more): one ``randperm`` from ``generator``, drawn at construction."""

    def __init__(self, batches: list[BlockBatch], max_tokens: int, generator: torch.Generator):
        sizes = [b.tokens for b in batches]
        total = sum(sizes)
        chosen = torch.randperm(total, generator=generator)[:max_tokens].sort().values if total > max_tokens else None
        self.local: list[torch.Tensor | None] = []  # per batch: its chosen token positions
        offset = 0
        for size in sizes:
            self.local.append(None if chosen is None else chosen[(chosen >= offset) & (chosen < offset + size)] - offset)
            offset += size

    def rows(self, x: torch.Tensor, batch_index: int) -> torch.Tensor:
        """``x`` ``(batch, seq, in)`` of batch ``batch_index`` -> its sampled tokens, fp32 on the CPU."""
        flat = x.reshape(-1, x.shape[-1])
        local = self.local[batch_index]
        if local is not None:
            flat = flat.index_select(0, local.to(flat.device))
        return flat.float().cpu()
