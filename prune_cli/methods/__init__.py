"""Weight-pruning methods. Adding one: a file with a :class:`WeightMethod` subclass declaring
what it is (statistics, patterns, weight updates, DSnoT base), plus one ``register`` line here.
The registration order is the order help texts and the DSnoT base list name them in."""

from __future__ import annotations

from prune_cli.core.selection import select
from prune_cli.methods.alps import ALPS
from prune_cli.methods.base import WEIGHT_METHODS, PruneResult, ScoreMethod, WeightMethod, build_method
from prune_cli.methods.dsnot import DSnoT
from prune_cli.methods.magnitude import Magnitude
from prune_cli.methods.ria import RIA
from prune_cli.methods.sparsegpt import SparseGPT
from prune_cli.methods.wanda import Wanda

WEIGHT_METHODS.register(Magnitude.name, Magnitude)
WEIGHT_METHODS.register(Wanda.name, Wanda)
WEIGHT_METHODS.register(SparseGPT.name, SparseGPT)
WEIGHT_METHODS.register(DSnoT.name, DSnoT)
WEIGHT_METHODS.register(ALPS.name, ALPS)
WEIGHT_METHODS.register(RIA.name, RIA)


__all__ = ["WEIGHT_METHODS", "PruneResult", "ScoreMethod", "WeightMethod", "build_method", "select"]
