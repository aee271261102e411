"""Suite-wide settings: one torch thread keeps tiny-model tests fast and deterministic on 2 busy cores."""

import torch

torch.set_num_threads(1)
