"""Ctrl-C for a command run as a process: the first stops it cleanly, a second stops it at once.

The first Ctrl-C raises ``KeyboardInterrupt`` in the command, which stops the way it says (labelling keeps
every record written whole, an index keeps its staged chunks, training checkpoints): exit 130, and the
same command with ``--resume`` goes on. A second Ctrl-C while that clean-up runs, and the end of an
interrupted command, leave through ``os._exit(130)``: the interpreter's own shutdown, with the worker
threads of the run still about (image loaders, torch's thread pools), aborted ("terminate called
without an active exception", SIGABRT) or died of the second signal, printing tracebacks from inside
torch (measured on ``mmllm label`` with two Ctrl-C 5-300 ms apart). Every file a command writes is
written whole line by line or staged, so leaving without the interpreter's shutdown loses nothing.

:func:`run` is each entry point's ``__main__``; the commands' ``main`` functions stay plain functions
returning an exit code (the tests call them in-process).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, NoReturn

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C
_taken: list[Callable[[], None]] = []  # while run() runs: what its first Ctrl-C does besides raising


def run(main: Callable[[], int]) -> NoReturn:
    """``sys.exit(main())`` with the Ctrl-C policy above. A command that handles the interrupt itself and
    ends otherwise than with 130 (the demo's server, whose app removes its folder at exit) leaves through
    the interpreter's shutdown as usual, with 130 for a 0 (a shell reads 130 as "stopped by Ctrl-C")."""
    interrupted = False

    def stop_now(signum: int, frame: object) -> None:
        _say("\ninterrupted again: stopping now (what was written is whole; --resume goes on)")
        os._exit(INTERRUPTED)

    def take() -> None:
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, stop_now)

    def first(signum: int, frame: object) -> None:
        take()
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, first)
        _taken.append(take)
    try:
        code = main()
    except KeyboardInterrupt:  # a command with no clean-up of its own
        _say("\ninterrupted")
        code = INTERRUPTED
    except BaseException:
        if interrupted:  # the clean-up failed too (a closed pipe: Ctrl-C reached `| tee` first): still 130
            os._exit(INTERRUPTED)
        raise
    finally:
        if _taken and _taken[-1] is take:
            _taken.pop()
    if interrupted and code == INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(INTERRUPTED)
    if interrupted and code == 0:  # stopped by Ctrl-C its own way (a server): a shell still reads 130
        code = INTERRUPTED
    sys.exit(code)


def taken() -> bool:
    """A command that stops cleanly on the first Ctrl-C by a handler of its own (the training loop: a
    checkpoint at the end of the step, then stop) says so from that handler: from here on a Ctrl-C stops at
    once, and the command's end leaves as an interrupted one does. False where no :func:`run` manages Ctrl-C
    (a command called in-process, SIGINT ignored): the caller's own second-signal rule stands."""
    if not _taken:
        return False
    _taken[-1]()
    return True


def _say(text: str) -> None:
    """A line on stderr that a closed pipe does not turn into an error."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass
