"""Hooks into a running `DiffusionEngine` for tests of its step loop."""

from __future__ import annotations

from collections.abc import Callable


def after_step(engine, n: int, action: Callable[[], None]) -> None:
    """Run `action` on the engine's worker right after its n-th commit decision (one per
    forward), so a test knows exactly which step saw it."""
    decide, steps = engine._decide, []

    def decide_then_act(*args):
        decide(*args)
        steps.append(1)
        if len(steps) == n:
            action()

    engine._decide = decide_then_act


def cancel_after_steps(engine, stream, n: int) -> None:
    """Cancel `stream` from inside the engine's n-th commit decision, so a test can check that
    no forward runs after the step that saw the cancel."""
    after_step(engine, n, stream.cancel)
