"""Stages the driver runs over the blocks: OWL allocation, pruning, activation calibration,
perplexity and task evaluation, and the checkpoint writer."""
