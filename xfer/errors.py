"""The one error type of the kernel.

Every check in `xfer` collects all violations it finds and raises a single `XferError` whose
message lists them, one per line, each naming the tensor, the shapes, the layouts and the ranks
involved. Checks run before any data moves; when ranks could disagree (a local tensor with the
wrong shape on one rank), the verdict is agreed over the communicator first, so that every rank
raises the same error instead of one raising while the others wait in a collective.
"""

from __future__ import annotations

from collections.abc import Iterable


class XferError(ValueError):
    """Bad input to the reshard kernel: a message per violation, all raised at once."""

    def __init__(self, violations: Iterable[str] | str) -> None:
        if isinstance(violations, str):
            violations = [violations]
        self.violations: tuple[str, ...] = tuple(violations)
        if len(self.violations) == 1:
            text = self.violations[0]
        else:
            text = f"{len(self.violations)} problems:\n" + "\n".join(
                f"  - {v}" for v in self.violations
            )
        super().__init__(text)


def raise_if(violations: list[str]) -> None:
    """Raise one `XferError` listing `violations`, if there are any."""
    if violations:
        raise XferError(violations)
