"""Replay and joint-training data mixing (seed paper, fully-cooperative setting)."""

from __future__ import annotations

from collections import Counter

import pytest

from cairn.data.mixing import joint_mix, replay_count, replay_mix, sample_indices
from cairn.errors import CairnError


def task(name: str, n: int) -> list[dict]:
    return [{"prompt": f"{name}-{i}", "answer": str(i)} for i in range(n)]


def test_replay_count_rounding():
    assert replay_count(0.1, 5000) == 500  # the paper's TRACE rounds
    assert replay_count(0.1, 395_000) == 39_500  # the paper's math round
    assert replay_count(0.1, 15) == 2  # 1.5 rounds half-up (Python's round() would give 2 too, 2.5 -> 2)
    assert replay_count(0.1, 25) == 3  # 2.5 -> 3, where round() would give 2
    assert replay_count(0.1, 4) == 1  # 0.4 -> at least one example while fraction > 0
    assert replay_count(0.0, 100) == 0
    assert replay_count(0.5, 0) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_fraction_is_a_cairn_error(bad):
    with pytest.raises(CairnError, match=r"\[0, 1\]"):
        replay_mix(task("c", 10), [task("a", 10)], bad, seed=0)


def test_replay_proportions_and_record():
    current, a, b, c = task("cur", 200), task("a", 50), task("b", 500), task("c", 7)
    examples, record = replay_mix(current, [a, b, c], 0.1, seed=3)
    assert examples[:200] == current
    assert len(examples) == 200 + 3 * 20
    assert Counter(t for t, _ in record) == {0: 20, 1: 20, 2: 20}
    for k, (t, i) in enumerate(record):  # record[k] describes examples[len(current) + k], not a copy
        assert examples[200 + k] is [a, b, c][t][i]
    # enough data: distinct examples
    assert len({i for t, i in record if t == 0}) == 20
    assert len({i for t, i in record if t == 1}) == 20
    # task c (7 examples) is upsampled to 20: every example 2 or 3 times (20 = 2·7 + 6)
    counts = Counter(i for t, i in record if t == 2)
    assert set(counts) == set(range(7))
    assert sorted(counts.values()) == [2] + [3] * 6


def test_replay_is_seeded_and_per_task_stable():
    current, a, b = task("cur", 100), task("a", 60), task("b", 80)
    _, r1 = replay_mix(current, [a, b], 0.1, seed=11)
    _, r2 = replay_mix(current, [a, b], 0.1, seed=11)
    _, r3 = replay_mix(current, [a, b], 0.1, seed=12)
    assert r1 == r2
    assert r1 != r3
    # adding a later task does not change what is drawn from the earlier ones
    _, r4 = replay_mix(current, [a, b, task("c", 30)], 0.1, seed=11)
    assert r4[: len(r1)] == r1


def test_replay_with_replacement_mode():
    rng_counts = Counter(i for _, i in replay_mix(task("cur", 400), [task("a", 5)], 0.1, seed=0,
                                                  mode="replacement")[1])
    assert sum(rng_counts.values()) == 40
    assert set(rng_counts) <= set(range(5))
    # i.i.d. draws are not balanced the way the default mode is (deterministic under this seed)
    assert len(set(rng_counts.values())) > 1


def test_replay_edge_cases():
    examples, record = replay_mix(task("cur", 10), [], 0.1, seed=0)
    assert len(examples) == 10 and record == []
    examples, record = replay_mix(task("cur", 10), [task("a", 5)], 0.0, seed=0)
    assert len(examples) == 10 and record == []
    with pytest.raises(CairnError, match="earlier task #1 has no training examples"):
        replay_mix(task("cur", 10), [task("a", 5), []], 0.1, seed=0)
    with pytest.raises(CairnError, match="mode"):
        sample_indices(5, 3, __import__("random").Random(0), mode="bogus")


def test_joint_without_upsampling_is_concatenation():
    a, b = task("a", 4), task("b", 2)
    assert joint_mix([a, b], upsample=False) == a + b


def test_joint_upsampling_makes_tasks_equally_likely():
    a, b, c = task("a", 10), task("b", 3), task("c", 7)
    mixed = joint_mix([a, b, c], upsample=True, seed=5)
    origin = Counter(x["prompt"].split("-")[0] for x in mixed)
    assert origin == {"a": 10, "b": 10, "c": 10}
    assert mixed[:10] == a  # the largest task is used as is
    per_b = Counter(x["prompt"] for x in mixed if x["prompt"].startswith("b-"))
    assert sorted(per_b.values()) == [3, 3, 4]  # 10 = 3·3 + 1
    per_c = Counter(x["prompt"] for x in mixed if x["prompt"].startswith("c-"))
    assert sorted(per_c.values()) == [1, 1, 1, 1, 2, 2, 2]  # 10 = 7 + 3
    assert joint_mix([a, b, c], upsample=True, seed=5) == mixed
    assert joint_mix([a, b, c], upsample=True, seed=6) != mixed


def test_joint_bad_input():
    with pytest.raises(CairnError, match="at least one task"):
        joint_mix([], upsample=True)
    with pytest.raises(CairnError, match="task #1"):
        joint_mix([task("a", 3), []], upsample=True)
