"""What Ray tasks ask for on a GPU device, and the clean-up before Ray's start is tried again
(orchestration.distributed.ray_runtime). Here, not in tests/test_device.py, because it imports Ray, which a
lent GPU machine lacks (docs/gpu.md)."""

import subprocess
import sys

import psutil
import torch

from orchestration.distributed.ray_runtime import GPU_TASKS_PER_CARD, end_new_children, gpu_request

NO_GPU = not torch.cuda.is_available()


def test_ray_tasks_ask_for_a_gpu_share_only_when_the_device_asks_for_a_gpu():
    assert gpu_request("cpu") == 0.0 and gpu_request("cuda:0") == 1.0 / GPU_TASKS_PER_CARD
    assert gpu_request("auto") == (0.0 if NO_GPU else 1.0 / GPU_TASKS_PER_CARD)
    assert gpu_request("cuda", share=1) == 1.0


def test_a_failed_start_ends_only_the_processes_it_started():
    # What a Ray start that timed out leaves: processes begun after the snapshot. One that ignores SIGTERM
    # is killed after the timeout; the one from before the snapshot lives on.
    sleep = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "print('ready', flush=True); time.sleep(60)"]
    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        stubborn = subprocess.Popen(sleep, stdout=subprocess.PIPE, text=True)
        assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
        polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        ended = end_new_children(before, timeout=1.0)
        assert sorted(ended) == sorted([stubborn.pid, polite.pid])
        # SIGKILL for the one that ignored SIGTERM; the other ended on SIGTERM, and psutil's wait collected
        # its status, so Popen reads 0 for it.
        assert stubborn.wait(timeout=10) == -9 and polite.wait(timeout=10) is not None
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()
