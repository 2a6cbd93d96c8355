"""What the repository's modules use of a :class:`~maskstore.repo.Repository` (declared here, so
that they never import the facade that imports them, not even for typing)."""

from __future__ import annotations

from typing import Any, Protocol

from ..store.stores import Store
from .objects import Objects
from .refs import Refs


class RepositoryLike(Protocol):
    store: Store
    objects: Objects
    refs: Refs
    path: str

    @property
    def config(self) -> dict: ...

    def source(self, version: str) -> Any: ...

    def snapshot(self, ref: str) -> Any: ...

    def author(self) -> str | None: ...

    def merge(self, ref: str, into: str = ..., ours: tuple = ..., theirs: tuple = ...) -> Any: ...
