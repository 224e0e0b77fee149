"""Continual-learning figures on hand-written matrices (arithmetic in the comments) and on the
seed paper's own Tables 1, 3 and 4 (arXiv:2410.13699)."""

from __future__ import annotations

import json

import pytest

from cairn.errors import CairnError
from cairn.eval import continual as C

# base + 3 rounds, 3 tasks (task i learned in round i+1)
R4 = [
    [0.2, 0.5, 0.0],  # base
    [0.6, 0.4, 0.1],  # after task 0
    [0.5, 0.8, 0.2],  # after task 1
    [0.4, 0.7, 0.9],  # after task 2 (final, K = 3)
]


def test_gain_from_base_4x3():
    # t0: (0.4-0.2)/0.2 = +100%; t1: (0.7-0.5)/0.5 = +40%; t2: base is 0 -> undefined (None)
    assert C.gain_from_base(R4) == pytest.approx([100.0, 40.0, None])
    # in points: 100*(0.4-0.2)=20, 100*(0.7-0.5)=20, 100*(0.9-0.0)=90
    assert C.gain_from_base_points(R4) == pytest.approx([20.0, 20.0, 90.0])
    # mean of the defined gains: (100+40)/2 = 70
    assert C.mean_gain_from_base(R4) == pytest.approx(70.0)
    # gain of the average: base mean 0.7/3, final mean 2.0/3 -> (2.0-0.7)/0.7 = 185.714...%
    assert C.gain_of_average(R4) == pytest.approx(100 * 1.3 / 0.7)


def test_acquisition_and_bwt_4x3():
    # diagonal R[i+1][i]: R[1][0]=0.6, R[2][1]=0.8, R[3][2]=0.9
    assert C.acquisition(R4) == pytest.approx([0.6, 0.8, 0.9])
    # paper BWT: t0 (0.4-0.6)/0.6 = -33.33%, t1 (0.7-0.8)/0.8 = -12.5%, t2 learned last -> None
    assert C.bwt_paper(R4) == pytest.approx([-100 / 3, -12.5, None])
    # mean (-33.333 - 12.5)/2 = -22.9167
    assert C.bwt_paper_mean(R4) == pytest.approx((-100 / 3 - 12.5) / 2)
    # absolute BWT: mean(0.4-0.6, 0.7-0.8) = mean(-0.2, -0.1) = -0.15
    assert C.bwt(R4) == pytest.approx(-0.15)


def test_fwt_average_last_4x3():
    # FWT: i=1: R[1][1]-R[0][1] = 0.4-0.5 = -0.1; i=2: R[2][2]-R[0][2] = 0.2-0.0 = 0.2 -> mean 0.05
    assert C.fwt(R4) == pytest.approx(0.05)
    # average accuracy: k=1: 0.6; k=2: (0.5+0.8)/2 = 0.65; k=3: (0.4+0.7+0.9)/3 = 0.6667
    #   -> (0.6 + 0.65 + 0.66667)/3 = 0.638889
    assert C.average_accuracy(R4) == pytest.approx((0.6 + 0.65 + 2.0 / 3) / 3)
    # last average: (0.4+0.7+0.9)/3
    assert C.last_average(R4) == pytest.approx(2.0 / 3)


# base + 2 rounds of a 3-task curriculum (stopped early), one entry not evaluated
R3 = [
    [0.1, 0.2, 0.4],
    [0.5, None, 0.4],
    [0.3, 0.6, 0.2],  # K = 2: tasks 0 and 1 learned, task 2 not yet
]


def test_partial_run_with_missing_entry_3x3():
    # gain: (0.3-0.1)/0.1 = 200%, (0.6-0.2)/0.2 = 200%, (0.2-0.4)/0.4 = -50%
    assert C.gain_from_base(R3) == pytest.approx([200.0, 200.0, -50.0])
    # acquisition: R[1][0]=0.5, R[2][1]=0.6, task 2 never learned -> None
    assert C.acquisition(R3) == pytest.approx([0.5, 0.6, None])
    # BWT only for tasks learned before the last round (i+1 < K=2 -> i=0): (0.3-0.5)/0.5 = -40%
    assert C.bwt_paper(R3) == pytest.approx([-40.0, None, None])
    assert C.bwt(R3) == pytest.approx(-0.2)  # 0.3 - 0.5
    # FWT over i = 1..min(2, 2): i=1 has R[1][1] = None (skipped); i=2: 0.2-0.4 = -0.2
    assert C.fwt(R3) == pytest.approx(-0.2)
    # average accuracy: k=1: 0.5; k=2: (0.3+0.6)/2 = 0.45 -> 0.475
    assert C.average_accuracy(R3) == pytest.approx(0.475)
    assert C.last_average(R3) == pytest.approx(1.1 / 3)


def test_relative_change_matrix():
    rc = C.relative_change(R3)
    # row 0 is 0% where defined; R[1][0]: (0.5-0.1)/0.1 = 400%; R[1][1] None stays None
    assert rc[0] == pytest.approx([0.0, 0.0, 0.0])
    assert rc[1] == pytest.approx([400.0, None, 0.0])
    assert rc[2] == pytest.approx(C.gain_from_base(R3))


def test_summarize_is_json_and_complete():
    s = C.summarize(R4, ["a", "b", "c"], row_labels=["base", "a", "b", "c"])
    json.dumps(s)  # serialisable
    assert s["curriculum"] is True and s["rounds"] == 3 and s["tasks"] == ["a", "b", "c"]
    assert s["bwt"] == pytest.approx(-0.15) and s["fwt"] == pytest.approx(0.05)
    assert s["acquisition"] == pytest.approx([0.6, 0.8, 0.9])
    assert s["base_average"] == pytest.approx(0.7 / 3)
    assert s["gain_from_base"][2] is None


def test_summarize_non_curriculum_run_has_no_diagonal_figures():
    # a merged model evaluated once: rows are not the tasks in order
    R = [[0.2, 0.4, 0.5], [0.3, 0.2, 0.5]]
    s = C.summarize(R, ["a", "b", "c"], row_labels=["base", "merge-ties"])
    assert s["curriculum"] is False
    assert s["bwt"] is None and s["fwt"] is None and s["average_accuracy"] is None
    assert s["acquisition"] == [None, None, None]
    # gain still defined: (0.3-0.2)/0.2 = 50%, (0.2-0.4)/0.4 = -50%, 0%
    assert s["gain_from_base"] == pytest.approx([50.0, -50.0, 0.0])


def test_malformed_matrices_are_user_errors():
    with pytest.raises(CairnError, match="row 1 has 2 scores but row 0 has 3"):
        C.bwt([[0.1, 0.2, 0.3], [0.1, 0.2]])
    with pytest.raises(CairnError, match="empty"):
        C.bwt([])
    with pytest.raises(CairnError, match=r"entry \[1\]\[0\]"):
        C.bwt([[0.1], ["x"]])
    with pytest.raises(CairnError, match="2 task names"):
        C.summarize(R4, ["a", "b"])


# ---- the seed paper's own numbers -------------------------------------------------------------

# Table 1 (FFT, old knowledge): base and final (FFT 1-7) rows; mmlu arc_c comqa hella opnbk piqa wino
T1_BASE = [0.6223, 0.5350, 0.6896, 0.7920, 0.4500, 0.8063, 0.7324]
T1_LAST = [0.5475, 0.4343, 0.6855, 0.7499, 0.43, 0.778, 0.7111]


def test_paper_table1_gain_row():
    gains = C.gain_from_base([T1_BASE, T1_LAST])
    # the paper prints -12.03% -18.82% -0.59% -5.31% -4.44% -3.51% -2.91% (from unrounded scores,
    # so allow the rounding of the 4-decimal inputs)
    assert gains == pytest.approx([-12.03, -18.82, -0.59, -5.31, -4.44, -3.51, -2.91], abs=0.015)
    # its AVE column (-7%) is the mean of these gains, not the gain of the average (-6.3%)
    assert round(C.mean_gain_from_base([T1_BASE, T1_LAST])) == -7


# Table 3 (FFT) and Table 4 (LoRA): rounds 1-7 on cstan fomc meet py150 sci 20min gsm8k
T3 = [
    [0.511, 0.4839, 0.0444, 0.3033, 0.115, 0.3709, 0.0008],
    [0.444, 0.7157, 0.0073, 0.0032, 0.1265, 0.3701, 0],
    [0.457, 0.6109, 0.39, 0.2256, 0.217, 0.3608, 0.1812],
    [0.459, 0.619, 0.3709, 0.5238, 0.2185, 0.3651, 0.1099],
    [0.448, 0.4657, 0.4013, 0.5248, 0.922, 0.3512, 0.0857],
    [0.461, 0.4657, 0.3927, 0.5211, 0.9255, 0.4078, 0.1266],
    [0.457, 0.4133, 0.3651, 0.4924, 0.917, 0.3896, 0.7293],
]
T4 = [
    [0.535, 0.5081, 0.1783, 0.0585, 0.7545, 0.3556, 0.5133],
    [0.5175, 0.7036, 0.1745, 0.063, 0.7615, 0.3624, 0.5171],
    [0.532, 0.6915, 0.3771, 0.067, 0.749, 0.3515, 0.5034],
    [0.515, 0.6815, 0.3463, 0.5438, 0.7065, 0.3641, 0.4882],
    [0.497, 0.6613, 0.3415, 0.5324, 0.8975, 0.3538, 0.3434],
    [0.5205, 0.6331, 0.3329, 0.5351, 0.8895, 0.4068, 0.4117],
    [0.508, 0.5988, 0.348, 0.5437, 0.531, 0.3903, 0.7096],
]
T6_BASE = [0.218, 0.256, 0.167, 0.045, 0.726, 0.351, 0.505]  # Table 6 "base" row


@pytest.mark.parametrize(
    "rounds, expected",
    [(T3, [-11, -42, -6, -6, -1, -4, None]), (T4, [-5, -15, -8, 0, -41, -4, None])],
    ids=["table3-fft", "table4-lora"],
)
def test_paper_bwt_rows(rounds, expected):
    got = C.bwt_paper([T6_BASE] + rounds)
    assert [None if g is None else round(g) for g in got] == expected


def test_paper_table3_gain_of_average_column():
    # Table 3's AVE gain (60%) is the gain of the average over its 8 columns (gsm8k and gsm-cot):
    # base mean 0.35225 (Table 6), final mean 0.5628 -> +59.8%
    base = T6_BASE + [0.550]
    last = T3[-1] + [0.7384]
    assert round(C.gain_of_average([base, last])) == 60
    # and cstance's gain (0.457-0.218)/0.218 = 109.6% -> printed 110%
    assert round(C.gain_from_base([base, last])[0]) == 110
