"""How the command line answers bad input: one line `error: ...` on stderr and exit status 2, as argparse does (and
as the scripts/ tools do); the traceback only with --debug. Errors that are not about the input (bugs) keep theirs.
"""

from __future__ import annotations

import errno
import sys
from typing import Any, Callable

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def input_error_message(err: BaseException) -> str | None:
    """The `error:` line for an error caused by the input or the machine (bad flag or file, full disk), else None."""
    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        where = f" while writing {err.filename!r}" if err.filename else ""
        return (f"the disk is full{where} ({err.strerror or 'no space left on device'}): free space or write "
                "elsewhere; the partly written file was removed, earlier checkpoints and outputs are intact")
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and err.filename:
        return f"{err.strerror}: {err.filename!r}"
    return None


def exit_on_input_error(fn: Callable[..., Any], *args: Any, debug: bool = False) -> Any:
    """`fn(*args)`; an input error becomes `error: ...` on stderr and `SystemExit(2)` (re-raised as is with `debug`)."""
    try:
        return fn(*args)
    except Exception as err:
        message = input_error_message(err)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
