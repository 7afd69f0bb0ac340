"""Sparsity patterns, parsed once at the boundary into types.

Masks everywhere in prune-cli are KEEP masks (True = keep the weight).

``NM(n_keep, m)`` means ``n_keep`` weights are KEPT in every ``m`` consecutive weights along
the input dimension of each output row (NVIDIA's meaning of "2:4"). Note that Wanda's and
llm-compressor's "2:4" means *prune* 2 of 4; for 2:4 both readings coincide, for 1:4 or 3:4
they do not, so we never pass "N:M" strings around after parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from prune_cli.core.errors import PatternError


@dataclass(frozen=True)
class Unstructured:
    """Remove the fraction ``sparsity`` of the weights of each output row (or matrix)."""

    sparsity: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.sparsity < 1.0):
            raise PatternError(
                f"sparsity must be in [0, 1), got {self.sparsity}",
                hint="sparsity is the fraction of weights removed, e.g. 0.5",
            )

    @property
    def target_sparsity(self) -> float:
        return self.sparsity

    def describe(self) -> str:
        return f"unstructured {self.sparsity:.0%}"

    def check_fits(self, in_features: int, name: str = "layer") -> None:
        return None


@dataclass(frozen=True)
class NM:
    """Keep ``n_keep`` of every ``m`` consecutive input weights in each output row."""

    n_keep: int
    m: int

    def __post_init__(self) -> None:
        if not (self.m >= 1 and 1 <= self.n_keep <= self.m):
            raise PatternError(
                f"N:M needs 1 <= N <= M, got {self.n_keep}:{self.m}",
                hint="N is the number of weights KEPT per group of M, e.g. 2:4",
            )

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n_keep / self.m

    def describe(self) -> str:
        return f"{self.n_keep}:{self.m}"

    def check_fits(self, in_features: int, name: str = "layer") -> None:
        if in_features % self.m:
            raise PatternError(
                f"{self.describe()} does not divide the input width {in_features} of {name}",
                hint=f"choose M dividing {in_features}, or exclude {name} from the targets",
            )


SparsityPattern = Union[Unstructured, NM]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str | None, sparsity: float | None) -> SparsityPattern:
    """Parse a pattern name ("unstructured", "2:4", "4:8") and a sparsity into a type.

    For N:M the sparsity is implied (1 - N/M); an explicit sparsity that disagrees is an error.
    """
    text = (text or "unstructured").strip().lower()
    if text == "unstructured":
        if sparsity is None:
            raise PatternError("unstructured pattern needs a sparsity", hint="pass --sparsity 0.5")
        return Unstructured(float(sparsity))
    match = _NM_RE.match(text)
    if not match:
        raise PatternError(
            f"unknown pattern {text!r}",
            hint="use 'unstructured' or N:M with N kept of every M, e.g. 2:4 or 4:8",
        )
    pattern = NM(int(match.group(1)), int(match.group(2)))
    if sparsity is not None and abs(float(sparsity) - pattern.target_sparsity) > 1e-9:
        raise PatternError(
            f"sparsity {sparsity} contradicts pattern {pattern.describe()} "
            f"(which removes {pattern.target_sparsity:.0%})",
            hint="drop --sparsity with an N:M pattern, or make them agree",
        )
    return pattern


def pattern_to_text(pattern: SparsityPattern) -> str:
    return "unstructured" if isinstance(pattern, Unstructured) else f"{pattern.n_keep}:{pattern.m}"
