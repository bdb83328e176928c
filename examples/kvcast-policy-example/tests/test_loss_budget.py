# SPDX-License-Identifier: GPL-3.0-or-later
"""Tests of `loss-budget` on kvcast's dry run: microseconds a session, no simulator, no network."""

from __future__ import annotations

import doctest

import kvcast_policy_example
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvcast_policy_example import LossBudgetPolicy

from kvcast.policies.base import TEXT, ChunkMenu, LevelOption, Session
from kvcast.policies.dryrun import dry_run
from kvcast.policies.planning import ConstantThroughput
from kvcast.policies.registry import default_registry

LEVELS = (("raw", 8_000_000, 0.0), ("q8", 4_000_000, 0.0004), ("q4", 2_000_000, 0.003))  # name, bytes, loss


def menus(n: int, recompute_s: float = 0.05) -> tuple[ChunkMenu, ...]:
    options = tuple(LevelOption(name, nbytes, 0.001, loss) for name, nbytes, loss in LEVELS)
    return tuple(ChunkMenu(i, 1024 * i, 1024, options, recompute_s) for i in range(n))


def test_the_docstring_examples_run():
    assert doctest.testmod(kvcast_policy_example).failed == 0


def test_kvcast_finds_it_by_its_entry_point():
    registry = default_registry()
    assert "loss-budget" in registry.names()
    assert "kvcast-policy-example" in registry.origin("loss-budget")
    policy = registry.create("loss-budget:loss=0.01")
    assert isinstance(policy, LossBudgetPolicy) and policy.loss == 0.01


@pytest.mark.parametrize("spec", ["loss-budget:loss=-1", "loss-budget:loss=inf", "loss-budget:speed=2",
                                  "loss-budget:x"])
def test_bad_arguments_are_refused(spec):
    with pytest.raises(ValueError, match="loss-budget"):
        default_registry().create(spec)


@pytest.mark.parametrize("loss, level", [(0.0, "raw"), (0.001, "q8"), (0.01, "q4")])
def test_the_link_loads_the_fewest_bytes_within_the_budget(loss, level):
    session = Session(menus(8), slo_s=1.0, prior_throughput_bps=1e10)
    result = dry_run(LossBudgetPolicy(f"loss={loss}"), session, ConstantThroughput(1e10))
    assert {a for a in result.actions if a != TEXT} == {level}


def loaded_chunks(bps: float, prior: bool = True) -> int:
    session = Session(menus(12), slo_s=1.0, prior_throughput_bps=bps if prior else None)
    return sum(a != TEXT for a in dry_run(LossBudgetPolicy(), session, ConstantThroughput(bps)).actions)


def test_a_faster_link_takes_more_chunks():
    counts = [loaded_chunks(bps) for bps in (1e8, 1e9, 1e10, 1e11)]
    assert counts == sorted(counts) and counts[0] < counts[-1] and counts[-1] >= 6


def test_loads_that_would_end_after_the_gpu_alone_are_left_to_it():
    # 100 Mbit/s: one 4 MB chunk takes 0.32 s, recomputing all 12 chunks 0.6 s, so the link takes the last
    # chunk only; at 10 Mbit/s (3.2 s a chunk) nothing is loaded, unless the link has not been measured yet.
    assert loaded_chunks(1e8) == 1
    assert loaded_chunks(1e7) == 0
    assert loaded_chunks(1e7, prior=False) == 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 16), budget=st.floats(0.0, 0.02),
       losses=st.lists(st.floats(0.0, 0.02), min_size=1, max_size=4),
       sizes=st.lists(st.integers(1, 10_000_000), min_size=4, max_size=4),
       bps=st.floats(1e6, 1e11), prior=st.one_of(st.none(), st.floats(1e6, 1e11)),
       recompute_s=st.floats(0.001, 0.2), ratio=st.floats(0.0, 2.0))
def test_invariants(n, budget, losses, sizes, bps, prior, recompute_s, ratio):
    """Whatever the menu and the link: the session finishes (the dry run raises on any invalid answer or a
    stall), text chunks come first and loaded ones last, and no chunk loses more than the budget."""
    options = tuple(LevelOption(f"l{k}", sizes[k], 0.001, loss) for k, loss in enumerate(losses))
    session = Session(tuple(ChunkMenu(i, 100 * i, 100, options, recompute_s * (1 + i / 10)) for i in range(n)),
                      slo_s=1.0, prior_throughput_bps=prior, lossy_prefix_ratio=ratio)
    result = dry_run(LossBudgetPolicy(f"loss={budget}"), session, ConstantThroughput(bps))
    texts = [a == TEXT for a in result.actions]
    assert texts == sorted(texts, reverse=True)  # a text prefix, then a loaded suffix
    assert texts[0]  # the GPU starts at once on chunk 0
    for action in result.actions:
        if action != TEXT:
            assert options[int(action[1:])].quality_loss <= budget
    if min(losses) > budget:
        assert all(texts)  # nothing is within the budget: the GPU does it all
    assert result.quality_loss <= budget
