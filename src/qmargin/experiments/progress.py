"""Progress of multi-step experiments (the reproductions), reported to an optional callback.

A reproduction knows its steps up front (training runs, campaigns, analyses); it calls
``progress(0, total, "")`` when it starts and ``progress(done, total, label)`` after each finished step.
The CLI draws a bar with an ETA from these calls (``qmargin reproduce``); library callers pass any
callable or nothing. Steps reused from an earlier, interrupted run finish at once (a resumed run's bar
moves quickly through them, and its first ETA is too optimistic until a real step has finished).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["StepProgress", "Steps"]

StepProgress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: ``done`` of ``total`` steps finished, the last one ``label``."""


class Steps:
    """Counts finished steps of a run of ``total`` and reports each to ``progress`` (if any)."""

    def __init__(self, total: int, progress: StepProgress | None) -> None:
        if total < 1:
            raise ValueError(f"a run has at least one step, got total={total}")
        self.total = total
        self.done_count = 0
        self._progress = progress
        if progress is not None:
            progress(0, total, "")

    def done(self, label: str) -> None:
        """One more step finished."""
        self.done_count += 1
        if self.done_count > self.total:
            raise RuntimeError(f"step {self.done_count} of {self.total}: the step count is wrong")
        if self._progress is not None:
            self._progress(self.done_count, self.total, label)
