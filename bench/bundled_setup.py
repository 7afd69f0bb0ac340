"""What the CPU benchmarks share: the command-line flags for the calibration / evaluation
windows, and the bundled SmolLM2-135M with those windows drawn from the disjoint calibration and
evaluation parts of the bundled text (seed 0), exactly as ``prune-cli compress`` draws them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from prune_cli.calibrators.sampling import calibration_windows, evaluation_windows, tokenize  # noqa: E402
from prune_cli.calibrators.sources import bundled_text  # noqa: E402
from prune_cli.model.source import bundled_source  # noqa: E402
from prune_cli.streaming.loader import load_model  # noqa: E402


def add_window_flags(parser: argparse.ArgumentParser, evaluation: bool = True, threads: bool = True) -> None:
    """``--samples``/``--seqlen`` (calibration), ``--eval-windows``, ``--threads``."""
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    if evaluation:
        parser.add_argument("--eval-windows", type=int, default=16, help="held-out evaluation windows")
    if threads:
        parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")


def add_run_filter(parser: argparse.ArgumentParser) -> None:
    """``--only NAME ...`` (substrings of the run names to keep) and ``--exact`` (whole names)."""
    parser.add_argument("--only", nargs="*", help="substrings of run names to keep")
    parser.add_argument("--exact", action="store_true", help="--only names must match whole run names")


def wanted(name: str, args: argparse.Namespace) -> bool:
    """Whether run ``name`` passes ``--only`` / ``--exact`` (:func:`add_run_filter`)."""
    return not args.only or any((o == name) if args.exact else (o in name) for o in args.only)


@dataclass
class Bundled:
    model: torch.nn.Module
    tokenizer: object
    cal_ids: torch.Tensor  # (tokens,) the whole calibration part
    cal: torch.Tensor  # (samples, seqlen) calibration windows, seed 0
    ev: torch.Tensor | None  # (eval_windows, seqlen) held-out windows


def load_bundled(args: argparse.Namespace) -> Bundled:
    """The bundled model and the windows ``args`` (from :func:`add_window_flags`) ask for; sets
    the torch thread count first when ``--threads`` was given."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(bundled_source())
    cal_ids = tokenize(tokenizer, bundled_text("calibration").text)
    cal = calibration_windows(cal_ids, args.samples, args.seqlen, seed=0)
    ev = None
    if getattr(args, "eval_windows", None):
        ev = evaluation_windows(tokenize(tokenizer, bundled_text("evaluation").text), args.eval_windows, args.seqlen)
    return Bundled(model, tokenizer, cal_ids, cal, ev)
