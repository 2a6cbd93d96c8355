"""Fault injection for tests: a store that kills its process after the n-th completed write.

Used by subprocesses that must die mid-commit or mid-push (``os._exit(137)``, as SIGKILL would
leave things: no cleanup, no flush of anything not yet written).
"""

from __future__ import annotations

import os

from maskstore.store.stores import Store


class KillAfter(Store):
    """Wraps a store; the ``n``-th completed ``put``/``create``/``swap`` ends the process."""

    def __init__(self, inner: Store, n: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.n = n
        self.writes = 0

    def _count(self) -> None:
        self.writes += 1
        if self.writes >= self.n:
            os._exit(137)

    def get(self, key, limit=None):
        return self.inner.get(key, limit)

    def read_into(self, key, buf):
        return self.inner.read_into(key, buf)

    def list(self, prefix):
        return self.inner.list(prefix)

    def children(self, prefix):
        return self.inner.children(prefix)

    def has(self, key):
        return self.inner.has(key)

    def size(self, key):
        return self.inner.size(key)

    def mtime(self, key):
        return self.inner.mtime(key)

    def put(self, key, data):
        self.inner.put(key, data)
        self._count()

    def create(self, key, data):
        made = self.inner.create(key, data)
        self._count()
        return made

    def swap(self, key, data, expected):
        self.inner.swap(key, data, expected)
        self._count()

    def delete(self, key):
        self.inner.delete(key)

    def lock(self, name, shared):
        return self.inner.lock(name, shared)

    def leftovers(self, prefix, older_than):
        return self.inner.leftovers(prefix, older_than)


class Slow(KillAfter):
    """Wraps a store; every read or write first sleeps ``delay`` seconds (a slow disk or a slow
    network), so that another process can act in the middle of an operation."""

    def __init__(self, inner: Store, delay: float) -> None:
        super().__init__(inner, n=1 << 62)
        self.delay = delay

    def _nap(self) -> None:
        import time

        time.sleep(self.delay)

    def has(self, key):
        self._nap()
        return self.inner.has(key)

    def put(self, key, data):
        self._nap()
        self.inner.put(key, data)
