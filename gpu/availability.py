"""Why the CuPy backend cannot run here: an exception both the resolver (:mod:`.backend`) and the
CuPy loader (:mod:`.cupy_backend`) use, in a module of its own so neither imports the other."""


class CupyUnavailable(Exception):
    """Why the CuPy backend cannot run here (raised by the loader, turned into a message)."""

    def __init__(self, reason: str, hint: str):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
