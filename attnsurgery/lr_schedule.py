"""The learning-rate shape both trainers use: linear warm-up, constant, then a linear cool-down to 0.

The cool-down averages out the noise of the constant phase: on the reference model a 600-step cool-down
raised held-out fidelity from 0.43 to 0.60 where 800 more constant steps had raised nothing.
"""

from __future__ import annotations

__all__ = ["warmup_cooldown"]


def warmup_cooldown(step: int, steps: int, warmup_steps: int, cooldown_steps: int) -> float:
    """LR factor at ``step`` (0-based) of ``steps``: ramps up over ``warmup_steps``, falls to 0 over the
    last ``cooldown_steps`` (0 disables either phase).

    Example:
        >>> [warmup_cooldown(s, 6, 2, 2) for s in range(6)]
        [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    """
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return factor * min(1.0, (steps - step) / cooldown_steps) if cooldown_steps else factor
