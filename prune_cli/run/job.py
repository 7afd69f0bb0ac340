"""What a compress run is asked to do (:class:`CompressRequest`) and what it works with once the
model is open (:class:`Job`: the model, the plan, the activation targets, the token windows)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from prune_cli.activation import ActivationMethod, build_activation_method
from prune_cli.activation.transform import check_supported
from prune_cli.calibrators.sources import Text
from prune_cli.checkpoint.output import OutputTarget
from prune_cli.core import distributed
from prune_cli.model.source import ModelSource, offline_requested
from prune_cli.model.structure import check_prunable
from prune_cli.recipe.config import RunConfig
from prune_cli.recipe.plan import Plan, build_plan
from prune_cli.run.inputs import read_tokens
from prune_cli.stages.activation import Target, activation_targets
from prune_cli.stages.export import checkpoint_bytes, weight_specs
from prune_cli.stages.tasks import TaskRun
from prune_cli.streaming.driver import BlockDriver
from prune_cli.streaming.loader import OpenedModel, open_model
from prune_cli.streaming.loader import save_dtype as model_save_dtype

log = logging.getLogger(__name__)


@dataclass
class CompressRequest:
    config: RunConfig
    model: str | None  # MODEL argument (None = bundled default)
    output: Path | None
    overwrite: bool = False
    offline: bool = False
    resume: bool | None = None  # True: continue an interrupted run; False: discard its state; None: keep it
    checkpoint_interval: float = 30.0  # seconds between resume-state writes (0: after every block)
    max_memory: str | None = None  # budget of the calibration activations ("8GB"); None: a share of the RAM
    baseline_cache: bool = True  # reuse the dense scores of an earlier run (prune_cli.run.baseline)


@dataclass
class Job:
    """What one compress run works with, gathered at load time."""

    opened: OpenedModel
    save_dtype: torch.dtype
    plan: Plan | None
    act_method: ActivationMethod | None
    act_targets: list[Target] | None
    cal_text: Text
    cal_windows: torch.Tensor
    val_windows: torch.Tensor | None
    eval_text: Text | None
    eval_windows: torch.Tensor | None
    bos: int | None = None  # the token id every window starts with (calibrators.sampling.resolve_bos)
    tasks: TaskRun | None = None  # the lm-eval requests, tokenised

    @property
    def driver(self) -> BlockDriver:
        return self.opened.driver

    # this process's share of the windows (all of them but under torchrun)
    @property
    def local_cal(self) -> torch.Tensor:
        windows = distributed.shard(self.cal_windows, "calibration")
        assert windows is not None  # a share of windows that exist
        return windows

    @property
    def local_val(self) -> torch.Tensor | None:
        return distributed.shard(self.val_windows, "validation")

    @property
    def local_eval(self) -> torch.Tensor | None:
        return distributed.shard(self.eval_windows, "evaluation")

    def shares(self) -> dict:
        """Windows per rank, by kind (for the report)."""
        n = distributed.size()
        kinds = {"calibration": self.cal_windows, "validation": self.val_windows, "evaluation": self.eval_windows}
        return {k: [b - a for a, b in (distributed.bounds(w.shape[0], n, r) for r in range(n))]
                for k, w in kinds.items() if w is not None}

    def close(self) -> None:
        """Let go of what holds files outside the run (the task suite's folder)."""
        if self.tasks is not None:
            self.tasks.suite.close()


def load_job(request: CompressRequest, source: ModelSource, device: torch.device, target: OutputTarget | None) -> Job:
    """Open the model for streaming, build the plan and the token windows."""
    config = request.config
    offline = offline_requested(request.offline)
    opened = open_model(source, config.dtype, device, offline)
    if opened.note:
        log.info(opened.note)
    model = opened.model
    saved = model_save_dtype(config.save_dtype, opened.stored_dtype)
    if target is not None:
        target.check_free_space(checkpoint_bytes(weight_specs(opened.driver, saved)))
    check_prunable(model, config.targets.include, config.activation is not None)
    blocks = opened.driver.found  # the blocks the driver walks
    plan = build_plan(blocks, config) if config.method else None
    act_targets = act_method = None
    if config.activation is not None:
        act_method = build_activation_method(config.activation.method, config.activation.options)
        act_targets = activation_targets(blocks, config.targets)
        if act_method.transforms_model:
            check_supported(model)  # fail before any walk, not after
    t = read_tokens(config, opened.tokenizer, opened.config, offline)
    return Job(opened, saved, plan, act_method, act_targets, t.cal_text, t.cal_windows, t.val_windows, t.eval_text,
               t.eval_windows, t.bos, t.tasks)
