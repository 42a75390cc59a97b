"""Hooks into a running `DiffusionEngine` for tests of its step loop."""

from __future__ import annotations


def cancel_after_steps(engine, stream, n: int) -> None:
    """Cancel `stream` from inside the engine's n-th commit decision (one per forward), so a
    test can check that no forward runs after the step that saw the cancel."""
    decide, steps = engine._decide, []

    def decide_then_cancel(*args):
        decide(*args)
        steps.append(1)
        if len(steps) == n:
            stream.cancel()

    engine._decide = decide_then_cancel
