"""Test-suite wide settings."""

from __future__ import annotations

import torch

# The tests use tiny tensors: one intra-op thread is faster and avoids stalls on a shared 2-core CI box.
torch.set_num_threads(1)
