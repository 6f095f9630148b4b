"""Ctrl-C for a command run as a process (mmllm/interrupt.py): the first stops it cleanly, a second one
during that clean-up stops it at once, and either way the exit status is 130 (a second Ctrl-C 5-300 ms
after the first made `mmllm label` abort with SIGABRT, die of SIGINT or print tracebacks from torch)."""

from __future__ import annotations

import signal
import subprocess
import sys

from helpers import ROOT

COMMAND = """
import sys, time
from mmllm import interrupt

def main():
    try:
        print("ready", flush=True)
        time.sleep(120)
    except KeyboardInterrupt:
        if sys.argv[1] == "uncaught":
            raise
        if sys.argv[1] == "broken":  # the clean-up's own line into a pipe Ctrl-C closed first (`| tee`)
            raise BrokenPipeError(32, "Broken pipe")
        if sys.argv[1] == "handled":  # a server that stops on Ctrl-C and ends as usual
            import atexit
            atexit.register(lambda: print("shut down as usual", file=sys.stderr, flush=True))
            return 0
        print("cleaning up", flush=True)
        time.sleep(120 if sys.argv[1] == "slow" else 0)
        return 130
    return 0

interrupt.run(main)
"""


def _started(mode: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", COMMAND, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_a_second_ctrl_c_during_the_clean_up_stops_at_once():
    process = _started("slow")
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline().strip() == "cleaning up"  # the first one: the command's own clean-up
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)  # not the clean-up's 120 s
    assert process.returncode == 130 and "interrupted again: stopping now" in err


def test_one_ctrl_c_ends_with_130_whether_the_command_handles_it_or_not():
    for mode, said in (("quick", ""), ("uncaught", "interrupted")):
        process = _started(mode)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, (mode, err)
        assert "Traceback" not in err and said in err and ("cleaning up" in out) == (mode == "quick")


def test_a_failing_clean_up_still_ends_130_and_a_command_ending_otherwise_shuts_down_as_usual():
    """A closed pipe (Ctrl-C reaches `| tee` first) made the clean-up's own line raise: exit 1 with a traceback,
    through the interpreter's shutdown. A command that ends otherwise after a Ctrl-C (the demo's server,
    which returned 0) leaves as usual, its exit handlers run (the demo's folder is removed by one), and
    with 130 as a shell expects."""
    process = _started("broken")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    process = _started("handled")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "shut down as usual" in err  # the demo ended 0 after a Ctrl-C
