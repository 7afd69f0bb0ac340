"""A run's claim on ``--output``, and what runs in one process only.

Under torchrun every rank checks what it can alone (:func:`check_data_parallel`); rank 0 claims
the output folder (:class:`~prune_cli.checkpoint.output.OutputTarget`: lock, staging folder) and
every rank learns whether that worked (:func:`claim_output`, :func:`claimed_on_rank_0`), so none
waits forever for a rank that gave up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prune_cli.checkpoint.output import OutputTarget
from prune_cli.core import distributed
from prune_cli.core.errors import BadInputError
from prune_cli.run.job import CompressRequest


def check_data_parallel(request: CompressRequest, hf_config) -> None:
    """Refuse what cannot run split over several processes (before any rank does work)."""
    if any(getattr(hf_config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise BadInputError("mixture-of-experts models run in one process (which experts a rank's tokens reach "
                            "differs between ranks)", hint="run it without torchrun / accelerate launch")
    if request.config.activation is not None:
        raise BadInputError("activation sparsity runs in one process (its thresholds are quantiles over all tokens)",
                            hint="run it without torchrun / accelerate launch")
    if request.resume:
        raise BadInputError("--resume runs in one process (each rank holds part of the state)",
                            hint="run without torchrun, or without --resume")


def claimed_on_rank_0(error: BaseException | None) -> None:
    """All ranks learn whether rank 0 could claim --output (so none waits forever for it)."""
    (failed,) = distributed.sum_numbers(0.0 if error is None else 1.0)
    if failed and error is None:
        raise BadInputError("rank 0 could not claim --output (see its error)")


@contextmanager
def claim_output(request: CompressRequest, output: Path) -> Iterator[OutputTarget]:
    """:class:`OutputTarget` for ``output`` (the request's); with several ranks, the others are
    told whether it worked."""
    target = OutputTarget(output, request.overwrite, request.resume)
    try:
        target.__enter__()
    except BaseException as exc:
        if distributed.active():
            claimed_on_rank_0(exc)
        raise
    if distributed.active():
        claimed_on_rank_0(None)
    try:
        yield target
    except BaseException as exc:
        target.__exit__(type(exc), exc, exc.__traceback__)
        raise
    target.__exit__(None, None, None)
