"""The base layer: errors, sparsity patterns, mask selection, finite checks, the name registry,
small shared helpers. Imports nothing else of prune-cli."""
