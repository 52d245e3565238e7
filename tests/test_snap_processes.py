"""The snap worker processes (service/snap_processes.py): they end with the process that started them."""

import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.live_server import still_running

ROOT = Path(__file__).resolve().parent.parent

SERVING = """
import time
from service import snap_processes
pool = snap_processes.start(2)
list(pool.map(abs, [-1, -2]))  # both workers started
print("ready", flush=True)
time.sleep(120)
"""


def test_workers_exit_when_the_serving_process_is_killed():
    """SIGKILL (the OOM killer, a host ending its worker) skips every shutdown: the workers notice their parent is
    gone and exit instead of waiting forever on a task pipe that they hold open themselves."""
    serving = subprocess.Popen([sys.executable, "-c", SERVING], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert serving.stdout is not None and serving.stdout.readline() == "ready\n"
        children = psutil.Process(serving.pid).children()  # the two workers and multiprocessing's resource tracker
        assert len(children) >= 2
    finally:
        serving.kill()
        serving.wait()
    deadline = time.monotonic() + 10
    while (left := [child for child in children if still_running(child)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [child.cmdline() for child in left]
