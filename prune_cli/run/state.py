"""The state the stages of one compress run share (:class:`Run`), and what the stages hand on:
the evaluation plan (:class:`Evaluation`), where the run writes (:class:`Output`), and what the
weight pruning did (:class:`Pruned`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prune_cli.activation.modules import SparsityTally
from prune_cli.checkpoint.output import OutputTarget
from prune_cli.core.records import LayerRecord, Timings
from prune_cli.gpu.backend import Backend
from prune_cli.model.moe import ExpertRecord
from prune_cli.model.source import ModelSource
from prune_cli.recipe.config import RunConfig
from prune_cli.recipe.plan import Plan
from prune_cli.run.baseline import DenseBaseline
from prune_cli.run.events import Events, Progress
from prune_cli.run.job import CompressRequest, Job
from prune_cli.stages.allocation import Allocation
from prune_cli.stages.evaluate import EvalStage
from prune_cli.stages.export import CheckpointWriter
from prune_cli.stages.tasks import TaskStage
from prune_cli.streaming.driver import Stage


@dataclass
class Run:
    """One compress run: what it was asked (:attr:`request`), the model's source, the device and
    backend it runs on, the output it claimed (``None`` without ``--output`` and on ranks but
    0), the progress callbacks, the timings, and the job once loaded (:attr:`job`)."""

    request: CompressRequest
    source: ModelSource
    device: torch.device
    backend: Backend
    target: OutputTarget | None
    events: Events
    timings: Timings = field(default_factory=Timings)
    started: float = field(default_factory=time.perf_counter)
    loaded: Job | None = None

    @property
    def config(self) -> RunConfig:
        return self.request.config

    @property
    def job(self) -> Job:
        """The loaded job (the load stage sets it)."""
        if self.loaded is None:
            raise RuntimeError("the run's model is not loaded yet")
        return self.loaded

    @property
    def progress(self) -> Progress:
        return Progress(self.events, self.job.driver)


@dataclass
class Evaluation:
    """The evaluation stages of a run (dense and compressed perplexity and tasks) and the walks
    they ride along: ``pending`` the next walk over the dense weights, ``finishing`` the walk
    that makes the last change (after it). ``cached``: the dense results came from the baseline
    cache (:mod:`prune_cli.run.baseline`), so no dense stage rides along."""

    dense_eval: EvalStage | None = None
    compressed_eval: EvalStage | None = None
    dense_tasks: TaskStage | None = None
    tally: SparsityTally | None = None
    pending: list[Stage] = field(default_factory=list)
    finishing: list[Stage] = field(default_factory=list)
    baseline: DenseBaseline | None = None
    cached: dict | None = None


@dataclass
class Output:
    """Where the run writes: the checkpoint writer (``None`` without ``--output``), the work
    folder (spilled activations, blocks kept between walks) and whether to remove it after."""

    writer: CheckpointWriter | None = None
    work: Path | None = None
    temporary_work: bool = False

    def work_folder(self) -> Path:
        if self.work is None:
            self.work, self.temporary_work = Path(tempfile.mkdtemp(prefix="prune-cli-work-")), True
        return self.work

    def remove_work(self, claimed: bool) -> None:
        """Remove a temporary work folder, and any work folder of a run without a claimed output
        (one with an output keeps it in the staging folder, which its export cleans)."""
        if self.work is not None and (self.temporary_work or not claimed):
            shutil.rmtree(self.work, ignore_errors=True)


@dataclass
class Pruned:
    """What the weight-pruning stage did: the final plan, OWL's allocation, one record per
    pruned Linear and per mixture-of-experts expert."""

    plan: Plan | None = None
    allocation: Allocation | None = None
    layers: list[LayerRecord] = field(default_factory=list)
    experts: list[ExpertRecord] = field(default_factory=list)
