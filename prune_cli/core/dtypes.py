"""The compute / save dtypes by their recipe names."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DTYPE_NAMES_BY_DTYPE = {v: k for k, v in DTYPES.items()}
