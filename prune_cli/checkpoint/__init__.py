"""Checkpoint I/O: weight files and their checks, streamed shards, the GGUF cache, the
output folder and its staging, resume state, the model card and the portable report."""
