import pytest

from ranke.train.schedule import warmup_cosine


def test_warmup_cosine_by_hand():
    factors = [warmup_cosine(step, warmup_steps=10, total_steps=110, min_ratio=0.1) for step in (0, 9, 10, 60, 110)]
    # warm-up (step + 1) / 10; then 0.1 + 0.9 * (1 + cos(pi * (step - 10) / 100)) / 2
    assert factors == pytest.approx([0.1, 1.0, 1.0, 0.55, 0.1])
