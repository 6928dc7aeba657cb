"""The one base class for errors the user can fix from the message alone.

The command line shows such an error as one line (the stage, the message, the fix) and keeps
the traceback in a log file; anything else is a bug and keeps its traceback on the console.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input, config or environment: the message names the file, field or key and the fix."""


def user_error_in(exc: BaseException | None) -> BaseException | None:
    """The first user error in ``exc``'s cause/context chain (a full disk counts), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
