"""prune-cli: training-free post-training compression of causal language models."""

__version__ = "0.1.0"
