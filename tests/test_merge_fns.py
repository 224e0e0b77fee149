"""Merge functions on hand-built tensors whose results were computed by hand (see the comments)."""

import pytest
import torch

from cairn.combine import merge_fns as mf
from cairn.errors import CairnError

T = torch.tensor


def test_linear_is_weighted_average_of_weights():
    # (1·1 + 3·3)/4 = 2.5 ; (1·2 + 3·6)/4 = 5
    out = mf.linear([T([1.0, 2.0]), T([3.0, 6.0])], weights=[1.0, 3.0])
    assert torch.allclose(out, T([2.5, 5.0]))
    assert torch.allclose(mf.linear([T([1.0, 2.0]), T([3.0, 6.0])]), T([2.0, 4.0]))


def test_task_arithmetic_weights_and_lambda():
    base = T([1.0, 1.0, 1.0])
    # τ1 = [1, -1, 0], τ2 = [0, 2, 0]; Σ w τ with w = [1, 0.5] = [1, 0, 0]; λ = 2 -> base + [2, 0, 0]
    out = mf.task_arithmetic([T([2.0, 0.0, 1.0]), T([1.0, 3.0, 1.0])], base, weights=[1.0, 0.5], lam=2.0)
    assert torch.allclose(out, T([3.0, 1.0, 1.0]))


def test_keep_count_floors_and_keeps_at_least_one():
    assert mf.keep_count(100, 0.29) == 29  # 0.29 * 100 = 28.999... in floating point
    assert mf.keep_count(10, 0.01) == 1
    assert mf.keep_count(10, 1.0) == 10
    assert mf.keep_count(5, 0.2) == 1


def test_magnitude_mask_keeps_top_k():
    mask = mf.magnitude_mask(T([0.5, -3.0, 2.0, -1.0]), 0.5)
    assert mask.tolist() == [False, True, True, False]


def test_magnitude_mask_breaks_ties_by_index():
    # k = 2, the threshold 1 is shared by three entries: the two with the lowest index are kept.
    mask = mf.magnitude_mask(T([1.0, -1.0, 1.0, 0.5]), 0.5)
    assert mask.tolist() == [True, True, False, False]
    # 2-D: flat order decides
    mask = mf.magnitude_mask(T([[2.0, 2.0], [2.0, 2.0]]), 0.75)
    assert mask.tolist() == [[True, True], [True, False]]


def test_threshold_mask_carries_ties_across_chunks():
    magnitudes = T([1.0, 3.0, 1.0, 1.0, 0.2, 1.0])
    threshold, n_above = mf.trim_threshold(magnitudes.numpy().copy(), 3)  # k = 3: {3, 1, 1}
    assert (threshold, n_above) == (1.0, 1)
    left = 3 - n_above
    m1, left = mf.threshold_mask(magnitudes[:3], threshold, left)
    m2, left = mf.threshold_mask(magnitudes[3:], threshold, left)
    assert torch.cat([m1, m2]).tolist() == [True, True, True, False, False, False]
    assert left == 0


# Three task vectors against a zero base (hand computation in the test body):
TAU = [T([3.0, -1.0, 2.0, 0.1]), T([-2.0, -2.0, 1.0, 0.2]), T([-2.0, 4.0, -0.5, 0.3])]
ZERO = torch.zeros(4)


def test_ties_trim_elect_disjoint_mean_by_hand():
    # density 0.5 keeps 2 of 4: τ1 -> [3, 0, 2, 0]; τ2 -> [-2, -2, 0, 0] (tie at 2 kept by index);
    # τ3 -> [-2, 4, 0, 0]. Totals: [-1, 2, 2, 0] -> signs [-, +, +, +] (0 elects +).
    # Agreeing means: pos0 (-2 - 2)/2 = -2; pos1 4; pos2 2; pos3 none -> 0.
    merged, stats = mf.generalized_merge(TAU, ZERO, sparsify="magnitude", consensus="sign_total", density=0.5)
    assert torch.allclose(merged, T([-2.0, 4.0, 2.0, 0.0]))
    assert stats.trimmed == 6  # 12 entries, 2 kept per model
    assert stats.sign_conflicts == 2  # positions 0 and 1 had both signs
    assert stats.election_removed == 2  # τ1's 3 at pos0 and τ2's -2 at pos1
    models = [1.0 + t for t in TAU]  # the same task vectors on a base of ones, with λ = 0.5
    assert torch.allclose(mf.ties(models, ZERO + 1.0, density=0.5, lam=0.5), 1.0 + 0.5 * T([-2.0, 4.0, 2.0, 0.0]))


def test_ties_frequency_sign_differs_from_total():
    tau = [T([5.0]), T([-1.0]), T([-1.0])]
    # total: 5 - 1 - 1 = 3 -> + -> mean of {5} = 5 ; frequency: one + and two - -> - -> mean of {-1, -1}
    assert torch.allclose(mf.ties(tau, torch.zeros(1), density=1.0, sign_method="total"), T([5.0]))
    assert torch.allclose(mf.ties(tau, torch.zeros(1), density=1.0, sign_method="frequency"), T([-1.0]))


def test_weight_order_paper_vs_mergekit_by_hand():
    w = [1.0, 1.0, 3.0]
    # paper: signs from unweighted [-, +, +, +]; pos0 (1·-2 + 3·-2)/2 = -4; pos1 3·4/1 = 12; pos2 2
    paper = mf.ties(TAU, ZERO, density=0.5, weights=w, weight_order="paper")
    assert torch.allclose(paper, T([-4.0, 12.0, 2.0, 0.0]))
    # mergekit: weighted τ3 = [-6, 12, 0, 0]; signs [-, +, +, +]; pos0 (-2 - 6)/(1 + 3) = -2; pos1 12/3 = 4
    mk = mf.ties(TAU, ZERO, density=0.5, weights=w, weight_order="mergekit")
    assert torch.allclose(mk, T([-2.0, 4.0, 2.0, 0.0]))


def test_mergekit_order_lets_a_weight_flip_the_elected_sign():
    tau, zero = [T([3.0]), T([-2.0])], torch.zeros(1)
    # paper: 3 - 2 > 0 -> + -> 1·3/1 = 3 ; mergekit: 3 - 4 < 0 -> - -> 2·(-2)/2 = -2
    assert torch.allclose(mf.ties(tau, zero, 1.0, weights=[1.0, 2.0], weight_order="paper"), T([3.0]))
    assert torch.allclose(mf.ties(tau, zero, 1.0, weights=[1.0, 2.0], weight_order="mergekit"), T([-2.0]))


def test_orders_agree_with_equal_weights():
    torch.manual_seed(0)
    tau = [torch.randn(50) for _ in range(3)]
    a = mf.ties(tau, torch.zeros(50), 0.3, weights=[0.7] * 3, weight_order="paper")
    b = mf.ties(tau, torch.zeros(50), 0.3, weights=[0.7] * 3, weight_order="mergekit")
    # paper: 0.7·mean ; mergekit: 0.7·Σ/(0.7·n) = mean -> equal up to the common weight
    assert torch.allclose(a, 0.7 * b)


def test_paper_order_matches_peft_ties():
    from peft.utils.merge_utils import ties as peft_ties

    torch.manual_seed(1)
    tau = [torch.randn(6, 7) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    ours = mf.ties(tau, torch.zeros(6, 7), 0.4, weights=w)
    theirs = peft_ties(tau, torch.tensor(w), 0.4)
    assert torch.allclose(ours, theirs)


def test_dare_rescales_survivors_and_keeps_mean():
    x = T([1.0, -2.0, 3.0, 0.5])
    y = mf.dare([x], torch.zeros(4), 0.3, seed=7)  # one model on a zero base: its delta, DARE-dropped
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.3)  # survivors are rescaled by 1/(1-p)
    total = torch.zeros(4)
    n = 4000
    drops = 0
    for seed in range(n):
        y = mf.dare([x], torch.zeros(4), 0.3, seed=seed)
        total += y
        drops += int((y == 0).sum())
    # E[y] = x; the std of the mean is |x|·sqrt(0.7/0.3)/sqrt(4000) ≈ 0.024|x|
    assert torch.allclose(total / n, x, rtol=0.1)
    assert abs(drops / (4 * n) - 0.7) < 0.01


def test_dare_linear_by_hand_with_known_mask():
    base = T([1.0, 1.0, 1.0, 1.0])
    models = [T([2.0, 3.0, 1.0, 0.0]), T([1.0, 0.0, 2.0, 1.0])]
    out = mf.dare(models, base, density=0.5, seed=3)
    masks = [mf.random_mask((4,), 0.5, torch.Generator().manual_seed(3 + t)) for t in range(2)]
    deltas = [T([1.0, 2.0, 0.0, -1.0]), T([0.0, -1.0, 1.0, 0.0])]
    expected = base + sum(d * m / 0.5 for d, m in zip(deltas, masks))
    assert torch.allclose(out, expected)
    assert not torch.equal(masks[0], masks[1])  # each model gets its own mask


def test_random_mask_same_in_chunks_as_at_once():
    whole = mf.random_mask((1000,), 0.4, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    parts = torch.cat([mf.random_mask((333,), 0.4, g), mf.random_mask((667,), 0.4, g)])
    assert torch.equal(whole, parts)


def test_dare_ties_with_density_one_is_ties_without_trim():
    assert torch.allclose(mf.dare_ties(TAU, ZERO, density=1.0), mf.ties(TAU, ZERO, density=1.0))
    # no trim: totals [-1, 1, 2.5, 0.6] -> [-, +, +, +]; pos0 -2; pos1 4; pos2 (2 + 1)/2; pos3 0.2
    assert torch.allclose(mf.ties(TAU, ZERO, density=1.0), T([-2.0, 4.0, 1.5, 0.2]))


def test_spec_validation():
    with pytest.raises(CairnError, match="density"):
        mf.MergeSpec("ties", density=0.0)
    with pytest.raises(CairnError, match="density"):
        mf.MergeSpec("dare", density=1.5)
    with pytest.raises(CairnError, match="unknown merge method"):
        mf.MergeSpec("soup")
    with pytest.raises(CairnError, match="2 weights for 3 models"):
        mf.MergeSpec("ties", weights=[1, 2]).weights_for(3)
    spec = mf.MergeSpec("average")
    assert spec.method == "linear" and not spec.needs_base
    spec = mf.MergeSpec("ties_dare", sign_method="frequency")
    assert (spec.sparsify, spec.consensus) == ("random", "sign_frequency")
