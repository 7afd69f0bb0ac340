"""The compute / save dtypes by their recipe names."""

from __future__ import annotations

import torch

from prune_cli.core.names import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


DTYPE_NAMES_BY_DTYPE = {v: k for k, v in DTYPES.items()}
