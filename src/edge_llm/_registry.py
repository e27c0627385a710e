"""A registry: named entries of one kind (kernels, voting rules), each owned in one place."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class _Named(Protocol):
    name: str


Entry = TypeVar("Entry", bound=_Named)


class Registry(dict[str, Entry], Generic[Entry]):
    """A dict of entries by their `name`, with `register` (refusing a name twice) and `lookup`
    (an unknown name is an error listing the known ones)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __contains__(self, name: object) -> bool:
        try:
            return super().__contains__(name)
        except TypeError:  # an unhashable value (a list from a config file) names no entry
            return False

    def register(self, entry: Entry) -> Entry:
        if entry.name in self:
            raise ValueError(f"A {self.kind} named {entry.name!r} is already registered.")
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> Entry:
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ValueError(f"Unknown {self.kind} {name!r}; known: {', '.join(map(repr, self))}.") from None
