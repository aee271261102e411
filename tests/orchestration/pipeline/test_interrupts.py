"""A Ctrl-C that Python swallows (raised inside a garbage-collector callback) still stops a staged run at
the next stage boundary. Runs in a subprocess: it installs a SIGINT handler and signals itself."""

import signal
import subprocess
import sys

SCRIPT = """
import os, signal, sys, weakref
from pathlib import Path
from orchestration.pipeline import interrupts
from orchestration.pipeline.stages import Stages

interrupts.install()

class Thing:
    pass

def callback(ref):
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10000):  # the handler runs here; its KeyboardInterrupt is printed and dropped
        pass

thing = Thing()
ref = weakref.ref(thing, callback)
del thing
print("survived the signal:", interrupts.requested(), flush=True)
Stages(Path(sys.argv[1])).run("next", "key", lambda out: print("the next stage ran", flush=True))
"""


def test_swallowed_ctrl_c_stops_before_the_next_stage(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert "Exception ignored" in proc.stderr and "KeyboardInterrupt" in proc.stderr  # Python dropped it
    assert "survived the signal: True" in proc.stdout
    assert "the next stage ran" not in proc.stdout
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stderr[-2000:])
    assert not list(tmp_path.glob("next-key/_DONE"))


def test_without_a_signal_stages_run():
    from orchestration.pipeline import interrupts

    interrupts.check()  # no Ctrl-C in this process: nothing raised
    assert not interrupts.requested()
