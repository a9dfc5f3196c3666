"""Test-suite wide settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# The tests use tiny tensors: one intra-op thread is faster and avoids stalls on a shared 2-core CI box.
torch.set_num_threads(1)

# Property-based tests search the same examples on every run: CI results do not depend on luck, and a
# failure found once is found again.
settings.register_profile("qmargin", derandomize=True)
settings.load_profile("qmargin")


@pytest.fixture(autouse=True)
def _no_system_datasets(request, monkeypatch):
    """Tests see no system-wide dataset copies (Debian's /usr/share/datasets/...), so a missing file
    stays missing on any machine; a test that wants them is marked ``system_data``."""
    if request.node.get_closest_marker("system_data") is None:
        import qmargin.data.registry as registry

        monkeypatch.setattr(registry, "SYSTEM_DATA_DIRS", {})
