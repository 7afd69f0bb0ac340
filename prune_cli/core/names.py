"""The closed sets of names the recipe and the command line accept, defined once, here.

This module imports nothing (no torch): the table of recipe keys
(:mod:`prune_cli.recipe.settings`) reads them when the command line starts, and
``prune-cli --help`` must not load torch. The modules that act on a name import it from here:
backends (:mod:`prune_cli.gpu.backend`), dtypes (:mod:`prune_cli.core.dtypes`), BOS modes
(:mod:`prune_cli.calibrators.sampling`), the mixture-of-experts fallbacks
(:mod:`prune_cli.model.moe`).
"""

BACKEND_NAMES = ("auto", "torch", "cupy")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch dtypes by their recipe names
BOS_MODES = ("auto", "always", "never")  # start every window with the BOS token: when the tokenizer adds one / always / never
MOE_FALLBACKS = ("all-tokens", "magnitude")  # an expert routed too few calibration tokens
MOE_DEFAULT_FALLBACK = "all-tokens"
MOE_DEFAULT_MIN_TOKENS = 128
