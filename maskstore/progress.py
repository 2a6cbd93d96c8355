"""The one progress convention: ``progress(done, total)`` (``total`` None when unknown),
called as work completes; a multi-stage job takes ``stage(name, total)``, which returns the
progress callback of that stage. Off by default everywhere; the command line draws bars."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int | None], None]
Stage = Callable[[str, int | None], Progress]


def counter(progress: Progress | None, total: int | None) -> Callable[[int], None]:
    """``advance(k)`` that reports ``progress(done, total)`` after each ``k`` units (a no-op
    without ``progress``)."""
    if progress is None:
        return lambda k: None
    done = 0

    def advance(k: int = 1) -> None:
        nonlocal done
        done += k
        progress(done, total)

    return advance
