"""The memory a streamed ``compress`` needs at its peak, predicted from the model's structure
(``--dry-run`` prints it) and the streams of hidden states the job keeps.

    peak = 1.35 x (libraries + outside the blocks + max(2 x largest block, lm_head when used)
                  + activations)

* libraries: this process's resident anonymous memory when the prediction is made (torch,
  transformers, the tokenizer and the texts, as a real run has them);
* outside the blocks: embeddings, final norm, ... in the compute dtype, except an input
  embedding kept in its stored dtype and an untied ``lm_head`` read only when the head is used
  (:mod:`prune_cli.streaming.driver`);
* two blocks: the largest block in the compute dtype, twice (the block and what a method
  computes from it: scores, masks, pruned copies, Hessians for the small models here);
* the ``lm_head`` phase: the head and one window's logits (``seqlen x vocab``), after a walk's
  blocks are gone, so the larger of the two phases counts (without an evaluation, Fisher
  weights or OWL search, only the export reads it, in its stored dtype);
* activations: :func:`activation_streams` (what :func:`prune_cli.core.memory.activation_bytes`
  sizes for ``--max-memory``);
* the 35%: allocator slack (free memory the C allocator keeps until a trim, see
  :class:`prune_cli.core.memory.FreedMemory`), thread stacks and Python objects. Measured, not
  assumed: a random bf16 Llama of 4 blocks (hidden 2048, untied 49k vocabulary; Wanda 50%, 4 x
  128 calibration, --no-eval) peaked at 1.22 GB resident anonymous memory for 0.93 GB of these
  parts (1.31x); ``bench/memory_prediction.py`` checks the rule at other depths and with the
  evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from prune_cli.checkpoint.model_state import state_names, tied_names
from prune_cli.core import memory
from prune_cli.methods.permutation import text_config
from prune_cli.model.structure import Blocks
from prune_cli.recipe.config import RunConfig
from prune_cli.streaming.driver import narrow_input, untied_output

SLACK = 1.35


def activation_streams(config: RunConfig, evaluates: bool, validation_tokens: int = 0) -> dict[str, int]:
    """Tokens of each stream of hidden states the job keeps (name -> tokens): the calibration
    windows, the dense and compressed evaluation windows, OWL's candidate streams over
    ``validation_tokens``, the Fisher pass's inputs (counted once per block by
    :func:`~prune_cli.core.memory.activation_bytes`)."""
    cal, ev = config.calibration, config.evaluation
    return {
        "calibration": cal.samples * cal.seqlen,
        "evaluation": 2 * ev.windows * ev.seqlen if evaluates else 0,
        "OWL candidates": 0 if config.owl is None else
        len(config.owl.m_grid) * len(config.owl.lambda_grid) * validation_tokens,
        "fisher inputs": 8 * cal.seqlen if config.activation is not None and config.activation.allocation == "greedy" else 0,
    }


def _bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())


def predicted_peak(
    model: nn.Module, blocks: Blocks, config: RunConfig, compute: torch.dtype, stored: torch.dtype | None,
    evaluates: bool, libraries: int | None = None,
) -> dict[str, float]:
    """The parts of the predicted peak in bytes (see the module docstring) and their total,
    ``predicted_peak``. ``model``: the structure (meta tensors are fine); ``libraries``: default
    this process's resident anonymous memory now (0 where it cannot be read)."""
    if libraries is None:
        libraries = memory.resident_anonymous_bytes() or 0
    tied = tied_names(model)
    inside = blocks.path + "."
    lazy = untied_output(model, tied, inside)
    narrow = narrow_input(model, tied, stored, compute) if stored is not None else None
    narrow_name = f"{narrow[0]}.weight" if narrow is not None else None
    outside = head = 0
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for name in state_names(model):
        if name.startswith(inside) or name in tied:
            continue
        tensor = tensors[name]
        size = _bytes(tensor, stored if name == narrow_name and stored is not None else compute)
        if lazy is not None and name.startswith(lazy[0] + "."):
            head += size
        else:
            outside += size
    block = max(sum(_bytes(p, compute) for p in b.parameters()) for b in blocks.modules)
    text = text_config(model)
    streams = activation_streams(config, evaluates)
    if head and (evaluates or streams["fisher inputs"] or config.owl is not None):
        head += config.evaluation.seqlen * int(text.vocab_size) * 4  # one window's float32 logits
    elif lazy is not None and stored is not None:  # only the export reads it, as stored
        head = sum(_bytes(t, stored) for t in lazy[1].parameters())
    activations = sum(memory.activation_bytes(int(text.hidden_size), compute.itemsize, len(blocks.modules),
                                              streams).values())
    parts: dict[str, float] = {"libraries": libraries, "outside_blocks": outside, "two_blocks": 2 * block, "lm_head_when_used": head,
             "activations": activations}
    parts["predicted_peak"] = int(SLACK * (libraries + outside + max(2 * block, head) + activations))
    parts["slack"] = SLACK
    return parts
