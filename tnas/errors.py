"""One exception type for every user-facing problem, and the CLI wrapper that prints it.

Library code raises :class:`TnasError` with a one-line message that names the file,
flag or value at fault; scripts run their ``main`` through :func:`cli_entry`, which prints
``error: <message>`` on stderr and exits with status 2 instead of a traceback (Ctrl-C:
``interrupted``, status 130, after the stage has saved what it must).
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class TnasError(Exception):
    """A problem with the user's input (a flag, a file, a value), reported in one line."""


def cli_entry(main: Callable[[], object]) -> None:
    """Run a script's ``main``; turn :class:`TnasError` into a one-line error and exit 2. Output piped
    into a reader that stops early (``| head``) ends the script quietly, as a shell tool does."""
    try:
        result = main()
    except TnasError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool ended this way
    if isinstance(result, int):
        sys.exit(result)
