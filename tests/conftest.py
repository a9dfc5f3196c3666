"""Test-suite wide settings."""

from __future__ import annotations

import torch
from hypothesis import settings

# The tests use tiny tensors: one intra-op thread is faster and avoids stalls on a shared 2-core CI box.
torch.set_num_threads(1)

# Property-based tests search the same examples on every run: CI results do not depend on luck, and a
# failure found once is found again.
settings.register_profile("qmargin", derandomize=True)
settings.load_profile("qmargin")
