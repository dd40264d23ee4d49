"""The shared warm-up / constant / cool-down learning-rate shape of the reference trainer and the distiller."""

import pytest

from attnsurgery.cli.distill_cmd import distill_parser
from attnsurgery.distill import DistillConfig
from attnsurgery.training import warmup_cooldown


def test_warms_up_holds_then_falls_to_zero() -> None:
    assert [warmup_cooldown(s, 8, 2, 4) for s in range(8)] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [warmup_cooldown(s, 3, 0, 0) for s in range(3)] == [1.0, 1.0, 1.0]


def test_the_distiller_takes_a_cool_down() -> None:
    args = distill_parser().parse_args(["--model", "m", "--data", "d", "--out", "o", "--cooldown-steps", "7"])
    assert args.cooldown_steps == 7
    with pytest.raises(ValueError, match="cooldown_steps must be <= steps"):
        DistillConfig(steps=5, cooldown_steps=6)
    with pytest.raises(ValueError, match="cooldown_steps must be >= 0"):
        DistillConfig(cooldown_steps=-1)
