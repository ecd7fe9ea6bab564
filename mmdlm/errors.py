"""`UserError`: a problem with what the user gave (a path, a model folder, an option), not a bug in mmdlm.

Entry points (`train.py`, the `python -m mmdlm.*` commands) print it as one sentence, `error: ...`, and exit
with status 2 instead of a traceback. It is a `ValueError`, so code that catches those still catches it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Raised with a one-sentence message that names the bad input and, where it helps, what would work."""
