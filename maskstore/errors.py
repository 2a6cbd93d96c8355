"""The exceptions maskstore raises: one hierarchy under :class:`MaskstoreError`, whose message is
a single line naming the problem and the fix. The command line prints it without a traceback
and exits 1 for :class:`IntegrityError` (damage), 2 for the others (bad input, conflicts)."""


class MaskstoreError(Exception):
    """Bad input, a conflict or damage; ``str(err)`` is one line fit for a user."""


class IntegrityError(MaskstoreError):
    """Stored bytes (or refs, or archives) do not match what was recorded: damage or tampering."""


class RefConflict(MaskstoreError):
    """A ref changed under us (another writer won the race), or would move where it may not."""


class MergeConflict(RefConflict):
    """Personas changed differently on both sides of a merge; ``conflicts`` names them."""

    def __init__(self, message: str, conflicts: list[str]) -> None:
        super().__init__(message)
        self.conflicts = conflicts


__all__ = ["IntegrityError", "MaskstoreError", "MergeConflict", "RefConflict"]
