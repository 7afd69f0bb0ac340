"""A name -> object registry with "did you mean" for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from prune_cli.core.errors import UnknownNameError

T = TypeVar("T")


def closest(name: str, choices, cutoff: float = 0.6) -> str | None:
    """The choice most like ``name`` (``difflib``'s ratio at least ``cutoff``), or ``None``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(name: str, choices: list[str]) -> str:
    """The hint for an unknown name: the closest choice, if any, and every choice."""
    close = closest(name, choices, cutoff=0.5)
    options = ", ".join(sorted(choices))
    if close:
        return f"did you mean {close!r}? (choices: {options})"
    return f"choices: {options}"


class Registry(Generic[T]):
    """Objects keyed by the names used on the command line and in recipes."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}", hint=did_you_mean(name, list(self._items))
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_registration_order(self) -> list[str]:
        """The names in the order they were registered (the order help texts list them in)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
