"""Whole runs: ``compress`` (:mod:`.pipeline`), ``eval``, ``sweep`` and ``verify``."""
