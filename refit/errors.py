"""`RefitError`: every problem found while preparing or running a refit, raised at once."""

from __future__ import annotations

from xfer import XferError


class RefitError(XferError):
    """Bad or inconsistent descriptions of the two sides, or a failed refit."""
