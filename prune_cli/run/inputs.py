"""What a run reads besides the weights, and the checks on it before any weight is read: the
device, the calibration and evaluation texts and their token windows, the lm-eval task
requests, and the window lengths against the model's context."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prune_cli.calibrators.sampling import (
    calibration_ids,
    calibration_windows,
    evaluation_ids,
    evaluation_windows,
    resolve_bos,
    validation_windows,
)
from prune_cli.calibrators.sources import Text, bundled_text, text_from_dataset, text_from_files
from prune_cli.core.errors import BadInputError
from prune_cli.recipe.config import CalibrationConfig, EvaluationConfig, RunConfig
from prune_cli.stages.tasks import TaskRun

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda requested but CUDA is not available", hint="use --device cpu or auto")
    return torch.device(name)


def calibration_text(cal: CalibrationConfig, offline: bool, tokenizer=None) -> Text:
    """The calibration text; ``.jsonl`` rows with ``messages`` rendered by ``tokenizer``'s chat
    template when ``cal.chat_template`` (see calibrators.sources)."""
    if cal.text:
        return text_from_files(list(cal.text), cal.column, _chat_renderer(tokenizer) if cal.chat_template else None)
    if cal.dataset:
        return text_from_dataset(cal.dataset, cal.split, cal.column, offline)
    return bundled_text("calibration")


def _chat_renderer(tokenizer) -> Callable[[list], str]:
    """``messages -> str`` by the tokenizer's own chat template (no generation prompt)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadInputError("--calib-chat-template: this model's tokenizer has no chat template",
                            hint="calibrate on plain text (a .txt file or a jsonl text field)")
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)


def evaluation_text(ev: EvaluationConfig) -> Text:
    """The held-out evaluation text: ``--eval-text`` files, else the bundled one."""
    return text_from_files(list(ev.text)) if ev.text else bundled_text("evaluation")


def context_length(model_config) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings``, GPT-2's
    ``n_positions`` maps onto it), or None when its config does not say."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    value = getattr(text_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_context(model_config, lengths: dict[str, int]) -> None:
    """Refuse window lengths beyond the model's context, before any weight is loaded."""
    limit = context_length(model_config)
    for flag, length in lengths.items():
        if limit is not None and length > limit:
            raise BadInputError(
                f"{flag} {length} is longer than the model's context ({limit} tokens, max_position_embeddings)",
                hint=f"pass {flag} {min(limit, 512)} or less",
            )


def window_lengths(config: RunConfig) -> dict[str, int]:
    """The window lengths a compress run uses, by the flag that sets each."""
    lengths = {"--seqlen": config.calibration.seqlen}
    if config.evaluation.enabled:
        lengths["--eval-seqlen"] = config.evaluation.seqlen
    return lengths


@dataclass
class Tokens:
    """What a run reads besides the weights: the texts, their token windows, the BOS token every
    window starts with, and lm-eval's requests (None without tasks)."""

    cal_text: Text
    cal_windows: torch.Tensor
    val_windows: torch.Tensor | None
    eval_text: Text | None
    eval_windows: torch.Tensor | None
    bos: int | None
    tasks: TaskRun | None = None


def read_tokens(config: RunConfig, tokenizer, model_config, offline: bool) -> Tokens:
    """Read the calibration and evaluation texts and make the token windows and the task
    requests (with the tokenizer alone: a real run and ``--dry-run`` refuse the same texts)."""
    cal = config.calibration
    cal_text = calibration_text(cal, offline, tokenizer)
    bos = resolve_bos(tokenizer, config.bos)
    if bos is not None:
        log.info("every window starts with the BOS token (id %d), as this tokenizer does by default", bos)
    validating = config.owl is not None and (config.owl.m is None or config.owl.lam is None)
    n_val = config.owl.validation_windows if config.owl is not None and validating else 0
    cal_ids = calibration_ids(tokenizer, cal_text, cal.samples + n_val, cal.seqlen, bos)
    cal_windows = calibration_windows(cal_ids, cal.samples, cal.seqlen, cal.seed, bos)
    val_windows = None
    if config.owl is not None and validating:
        val_windows = validation_windows(cal_ids, cal.samples, config.owl.validation_windows, cal.seqlen, cal.seed, bos)
    ev = config.evaluation
    eval_text = eval_windows = None
    if ev.enabled:
        eval_text = evaluation_text(ev)
        eval_windows = evaluation_windows(evaluation_ids(tokenizer, eval_text, ev.windows, ev.seqlen, bos), ev.windows, ev.seqlen, bos)
    tasks = None
    settings = ev.task_settings() if ev.enabled else None
    if settings is not None:
        tasks = TaskRun(settings, tokenizer, model_config, bos)  # lm-eval's requests, before any walk
    return Tokens(cal_text, cal_windows, val_windows, eval_text, eval_windows, bos, tasks)
