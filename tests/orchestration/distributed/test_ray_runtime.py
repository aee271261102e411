"""What Ray tasks ask for on a GPU device (orchestration.distributed.ray_runtime). Here, not in
tests/test_device.py, because it imports Ray, which a lent GPU machine lacks (docs/gpu.md)."""

import torch

from orchestration.distributed.ray_runtime import GPU_TASKS_PER_CARD, gpu_request

NO_GPU = not torch.cuda.is_available()


def test_ray_tasks_ask_for_a_gpu_share_only_when_the_device_asks_for_a_gpu():
    assert gpu_request("cpu") == 0.0 and gpu_request("cuda:0") == 1.0 / GPU_TASKS_PER_CARD
    assert gpu_request("auto") == (0.0 if NO_GPU else 1.0 / GPU_TASKS_PER_CARD)
    assert gpu_request("cuda", share=1) == 1.0
