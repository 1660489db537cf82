"""One exception type for every user-facing problem, and the CLI wrapper that prints it.

Library code raises :class:`TnasError` with a one-line message that names the file,
flag or value at fault; scripts run their ``main`` through :func:`cli_entry`, which prints
``error: <message>`` on stderr and exits with status 2 instead of a traceback (Ctrl-C:
``interrupted``, status 130, after the stage has saved what it must). Under torchrun the
line names the rank, and a rank whose collective broke because another rank stopped says so in
one line (status 1) instead of adding the backend's traceback to the failing rank's error.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

PEER_GONE = re.compile(r"closed by peer|reset by peer|remote worker|remote process|broken pipe", re.IGNORECASE)
"""What gloo and NCCL say when the other end of a collective has gone (its process ended)."""


def rank_tag() -> str:
    """``"rank R: "`` in a process that torchrun started with more than one rank, else ``""`` (also for a
    ``WORLD_SIZE`` that is no integer: the error line must come out whatever the environment holds)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return ""
    return f"rank {os.environ.get('RANK', '?')}: " if world_size > 1 else ""


def _raised_in_collective(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is torch.distributed's (a collective or the
    store): the stages leave the process group in a ``finally``, so by the time :func:`cli_entry` sees
    the error the group may be gone, but the traceback still says where it came from."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank's process went away: a
    RuntimeError under torchrun, in the words of :data:`PEER_GONE`, raised by torch.distributed or
    while a process group is up."""
    if not isinstance(error, RuntimeError) or not rank_tag() or not PEER_GONE.search(str(error)):
        return False
    if _raised_in_collective(error):
        return True
    try:
        import torch.distributed as dist
        return dist.is_available() and dist.is_initialized()
    except ImportError:
        return False


class TnasError(Exception):
    """A problem with the user's input (a flag, a file, a value), reported in one line."""


def cli_entry(main: Callable[[], object]) -> None:
    """Run a script's ``main``; turn :class:`TnasError` into a one-line error and exit 2. Output piped
    into a reader that stops early (``| head``) ends the script quietly, as a shell tool does."""
    try:
        result = main()
    except TnasError as error:
        print(f"error: {rank_tag()}{error}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        # gloo's "[.../pair.cc:561] Connection closed by peer [host]:port. This is typically ...": the first sentence
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0].splitlines()[0]
        print(f"error: {rank_tag()}stopped: another rank ended (its error is above or in its log): {first_line}",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # the reader is gone: point stdout at /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool ended this way
    if isinstance(result, int):
        sys.exit(result)
