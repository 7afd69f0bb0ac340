"""WINA (Chen et al. 2025, "Weight Informed Neuron Activation"): ``m_i = 1[|x_i| * ||W_:,i||_2 > tau]``
with ``tau`` the ``s``-quantile of ``|X| * ||W_:,i||`` — on every targeted Linear (the release
applies the weight-norm criterion only to k_proj and gate_proj). ``transform: true`` first
applies the paper's tensor transform (:mod:`prune_cli.activation.transform`: norm weights
folded into q/k/v and gate/up, inputs rotated so k_proj's and gate_proj's columns are
orthogonal; the dense function is unchanged)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_cli.activation.base import ActivationMethod, RuntimeForm, column_norms, quantile_threshold
from prune_cli.activation.modules import SparseInputLinear
from prune_cli.core.errors import RecipeError

# The release computes one mask per hidden state from a single reader's column norms.
RELEASED_NORM_SOURCE = {"self_attn.q_proj": "self_attn.k_proj", "self_attn.k_proj": "self_attn.k_proj",
                        "self_attn.v_proj": "self_attn.k_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj"}


@dataclass(frozen=True)
class Wina(ActivationMethod):
    """WINA: thresholds on |x_i| * ||W_:,i||_2 (weight-informed)."""

    name = "wina"
    selection: str = "threshold"  # threshold (calibrated) | topk (per token, as released)
    variant: str = "all"  # all: the criterion on every Linear | released: only k_proj/gate_proj norms
    transform: bool = False  # the paper's tensor transform (prune_cli.activation.transform)

    def validate(self):
        if not isinstance(self.transform, bool):
            raise RecipeError(f"wina transform must be true or false, got {self.transform!r}")
        if self.selection not in ("threshold", "topk"):
            raise RecipeError(f"wina selection must be threshold or topk, got {self.selection!r}")
        if self.variant not in ("all", "released"):
            raise RecipeError(f"wina variant must be all or released, got {self.variant!r}")

    @property
    def runtime_form(self) -> RuntimeForm:
        """Column norms as the channel scale; with ``selection: topk`` a per-token keep count."""
        return RuntimeForm(scaled=True, per_token_topk=self.selection == "topk")

    @property
    def transforms_model(self) -> bool:
        return self.transform

    def channel_scale(self, linear, context: dict | None = None):
        if self.variant == "released":
            local = (context or {}).get("local")
            source = RELEASED_NORM_SOURCE.get(local)
            if source is None:
                return torch.ones(linear.in_features)  # o_proj / down_proj: plain magnitudes
            return column_norms(context["linears"][source])
        return column_norms(linear)

    def scores(self, linear, x, context=None):
        return x.abs() * self.channel_scale(linear, context).to(x.device)

    def fit(self, linear, x, sparsity, cache=None, backend=None):
        """``threshold``: ``tau`` = the ``sparsity``-quantile of ``|x[t, j]| * c_j`` over all
        ``(n, in)`` entries, ``c = channel_scale`` ``(in,)`` fp32; ``topk``: no threshold."""
        scale = self.channel_scale(linear, cache)
        if self.selection == "topk":
            keep = max(1, int(round((1 - sparsity) * linear.in_features)))
            return SparseInputLinear(linear, -1.0, scale, keep_count=keep if sparsity > 0 else 0)
        return SparseInputLinear(linear, quantile_threshold(x, sparsity, scale, backend), scale)
