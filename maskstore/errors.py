"""The one exception type maskstore raises for bad input: its message is a single line that names
the problem and the fix, and the CLI prints it without a traceback."""


class MaskstoreError(Exception):
    """Bad input or a damaged bundle; ``str(err)`` is one line fit for a user."""


class IntegrityError(MaskstoreError):
    """Stored bytes do not match their recorded digest."""
