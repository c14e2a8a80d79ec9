"""The scale benchmark's order of levels: the fairness its ratios rely on."""

from __future__ import annotations

import pytest

from bench.run import scale_level_order


def test_the_first_repetition_measures_from_the_fewest_keys_up() -> None:
    assert scale_level_order([1_000_000, 10_000, 100_000], 0) == [10_000, 100_000, 1_000_000]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_over_as_many_repetitions_as_levels_each_level_takes_every_place_once(count: int) -> None:
    levels = [10**n for n in range(count)]
    orders = [scale_level_order(levels, rep) for rep in range(count)]
    for order in orders:
        assert sorted(order) == levels
    for place in range(count):
        assert sorted(order[place] for order in orders) == levels


def test_the_order_repeats_after_as_many_repetitions_as_levels() -> None:
    levels = [2_000, 10_000]
    assert scale_level_order(levels, 2) == scale_level_order(levels, 0)
    assert scale_level_order(levels, 3) == [10_000, 2_000]
