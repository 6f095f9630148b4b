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


def _as_from_a_terminal() -> None:
    """In the child before it starts: Ctrl-C as a terminal delivers it. A suite run as a background job (`make
    test &`, nohup) hands its children SIGINT ignored, and `interrupt.run` rightly leaves an ignored SIGINT
    alone: every test here would wait out the command's 120 s and fail."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _started(mode: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", COMMAND, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, preexec_fn=_as_from_a_terminal)
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


TRAINING = """
import atexit, sys, time
from mmllm import interrupt
from mmllm.training import _StopFlag

def main():
    atexit.register(lambda: print("the interpreter's shutdown", file=sys.stderr, flush=True))
    stop = _StopFlag()  # the training loop's own first Ctrl-C: a checkpoint at the end of the step
    print("ready", flush=True)
    while not stop.requested:
        time.sleep(0.01)
    print("checkpointing", flush=True)
    time.sleep(120 if sys.argv[1] == "during" else 0)
    stop.restore()
    print("after the loop", flush=True)
    time.sleep(120 if sys.argv[1] == "after" else 0)  # what follows a stopped loop (its message, the summary)
    return 130

interrupt.run(main)
"""


def test_the_training_loops_own_ctrl_c_follows_the_same_policy():
    """The loop catches the first Ctrl-C itself (checkpoint, then stop). It took the handler `interrupt.run`
    installs and put back the first-Ctrl-C one: a second Ctrl-C after the loop counted as a first, the end went
    through the interpreter's shutdown (1.9 s, where a second Ctrl-C made it die of SIGINT, exit -2)."""
    for mode in ("during", "after", "once"):
        process = subprocess.Popen([sys.executable, "-c", TRAINING, mode], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=_as_from_a_terminal)
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGINT)
        assert _line(process) == "signal 2: saving a checkpoint at the end of this step, then stopping"
        assert _line(process) == "checkpointing"
        if mode == "after":
            assert _line(process) == "after the loop"
        if mode != "once":
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)  # not the 120 s
        assert process.returncode == 130, (mode, err)
        assert ("interrupted again: stopping now" in err) == (mode != "once"), (mode, err)
        assert "the interpreter's shutdown" not in err and "Traceback" not in err, (mode, err)


def _line(process: subprocess.Popen) -> str:
    """The next line the process prints that is not blank."""
    for line in process.stdout:
        if line.strip():
            return line.strip()
    raise AssertionError(f"the process ended (exit {process.wait()}): {process.stderr.read()}")
