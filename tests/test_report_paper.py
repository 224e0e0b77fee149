"""One-round rows, seeds (mean ± sd), bootstrap intervals, significance and findings on hand-built runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cairn.report import build_report
from cairn.report.findings import evaluate_findings
from cairn.report.runs import load_runs
from cairn.report.stats import bootstrap_ci, mean_sd, paired_bootstrap
from cairn.report.tables import comparison_tables, new_knowledge_table, old_knowledge_table, significance_table

TASKS = [{"name": "a", "metric": "exact_match"}, {"name": "b", "metric": "exact_match"}]
BASE = [0.1, 0.2]


def _write(d: Path, results: dict, config: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(results))
    if config:
        (d / "config.yaml").write_text(config)
    return d


def _exp(root: Path, methods: dict[str, dict], config: str = "") -> Path:
    """An experiment directory: ``methods`` maps a name to results (or to {seed: results})."""
    root.mkdir(parents=True, exist_ok=True)
    for name, res in methods.items():
        if "matrix" in res:
            _write(root / name, res)
        else:
            for s, r in res.items():
                _write(root / name / f"seed-{s}", r)
    (root / "experiment.json").write_text(json.dumps({"methods": list(methods), "status": {m: "ok" for m in methods}}))
    if config:
        (root / "config.yaml").write_text(config)
    return root


def _res(name, matrix, rows, old=None, **extra):
    r = {"name": name, "method": name, "tasks": TASKS, "rows": rows, "matrix": matrix} | extra
    if old is not None:
        r["old_knowledge"] = old
    return r


SEQ_ROWS = ["base", "a", "b"]
ONE_ROWS = ["base", "only-a", "only-b"]
# one-round: row 1 = model trained only on a, row 2 = only on b; the diagonal is (0.9, 0.7)
ONE = [BASE, [0.9, 0.1], [0.3, 0.7]]
ONE_OLD = {"tasks": ["arc", "piqa"], "metric": {}, "matrix": [[0.5, 0.6], [0.4, 0.6], [0.3, 0.5]],
           "stderr": [[0.01, 0.01]] * 3}
SEQ = [BASE, [0.8, 0.2], [0.5, 0.6]]
SEQ_OLD = {"tasks": ["arc", "piqa"], "metric": {}, "matrix": [[0.5, 0.6], None, [0.45, 0.55]],
           "stderr": [[0.01, 0.01], None, [0.01, 0.01]]}


# ------------------------------------------------------------------ one-round rows


@pytest.mark.parametrize("marker", [{"strategy": "one-round"}, {}])  # results key, or rows only-<task>
def test_one_round_rows_use_the_diagonal_and_fig2_mean(tmp_path, marker):
    exp = _exp(tmp_path / "exp", {"seq-lora": _res("seq-lora", SEQ, SEQ_ROWS, SEQ_OLD),
                                  "only-lora": _res("only-lora", ONE, ONE_ROWS, ONE_OLD, **marker)})
    runs = load_runs([exp]).runs
    assert runs[1].one_round and not runs[0].one_round
    new, old, summary = comparison_tables(runs)
    assert new.rows[2] == ["only-lora", "90.0", "70.0", "80.0"]  # diagonal, not the last row (30, 70)
    assert new.rows[1] == ["seq-lora", "50.0", "60.0", "55.0"]
    # Fig. 2: old knowledge averaged over the one-round models: arc (0.4+0.3)/2, piqa (0.6+0.5)/2
    assert old.rows[2] == ["only-lora", "35.0", "55.0", "45.0"]
    s = {r[0]: r[1:] for r in summary.rows}
    # new: base avg 15, own-model avg 80, gain of avg 100*(0.8-0.15)/0.15; old: 45.0, mean gain (-30%, -8.33%)
    assert s["only-lora"][:3] == ["15.0", "80.0", "+433.3%"]
    assert s["only-lora"][7:] == ["45.0", "-19.17%"]
    assert s["only-lora"][4:7] == ["–", "–", "–"]  # no BWT/FWT for independent models
    t = new_knowledge_table(runs[1].results, "only-lora", spec=runs[1].spec)
    rows = {r[0]: r[1:] for r in t.rows}
    assert rows["own model (diagonal)"] == ["90.0", "70.0", "80.0"]
    assert rows["gain from base (%)"] == ["+800.0%", "+250.0%", "+433.3%"]
    o = {r[0]: r[1:] for r in old_knowledge_table(runs[1].results, "only-lora", spec=runs[1].spec).rows}
    assert o["mean over one-round models"] == ["35.0", "55.0", "45.0"]


def test_one_round_report_draws_fig2(tmp_path):
    exp = _exp(tmp_path / "exp", {"seq-lora": _res("seq-lora", SEQ, SEQ_ROWS, SEQ_OLD),
                                  "only-lora": _res("only-lora", ONE, ONE_ROWS, ONE_OLD, strategy="one-round")})
    page = build_report([exp], tmp_path / "out")
    assert (tmp_path / "out" / "plots" / "one_round_old.png").stat().st_size > 5000
    html = page.read_text()
    assert "paper Fig. 2" in html and "Findings" in html
    assert (tmp_path / "out" / "findings.md").is_file()


# ------------------------------------------------------------------ seeds


def _seeded(matrices, olds=None):
    return {s: _res("seq-fft", m, SEQ_ROWS, None if olds is None else olds[s], seed=s) for s, m in enumerate(matrices)}


SEEDS = [
    [BASE, [0.8, 0.2], [0.4, 0.6]],
    [BASE, [0.6, 0.2], [0.5, 0.7]],
    [BASE, [0.7, 0.2], [0.6, 0.8]],
]


def test_mean_sd():
    assert mean_sd([0.4, 0.5, 0.6]) == (pytest.approx(0.5), pytest.approx(0.1), 3)
    assert mean_sd([0.4, None]) == (0.4, None, 1)


def test_seeds_show_mean_and_sd_in_every_table(tmp_path):
    exp = _exp(tmp_path / "exp", {"seq-fft": _seeded(SEEDS)})
    (run,) = load_runs([exp]).runs
    assert run.seeded and [x.results["seed"] for x in run.seed_runs] == [0, 1, 2]
    assert run.results["matrix"][2] == [pytest.approx(0.5), pytest.approx(0.7)]  # element-wise mean
    new, summary = comparison_tables([run])
    # final a: 0.4/0.5/0.6 -> 50.0 ± 10.0; b: 0.6/0.7/0.8 -> 70.0 ± 10.0; AVE 0.5/0.6/0.7 -> 60.0 ± 10.0
    assert new.rows[1] == ["seq-fft", "50.0 ± 10.0", "70.0 ± 10.0", "60.0 ± 10.0"]
    # BWT (points) per seed: 100*(0.4-0.8), (0.5-0.6), (0.6-0.7) -> -40, -10, -10: mean -20, sd 17.3
    assert summary.rows[0][6] == "-20.0 ± 17.3"
    t = new_knowledge_table(run.results, "seq-fft", [x.results for x in run.replicas], run.spec)
    rows = {r[0]: r[1:] for r in t.rows}
    assert rows["after a"][0] == "70.0 ± 10.0"
    assert rows["BWT (%)"][0] == "-27.0% ± 20.0"  # -50%, -16.67%, -14.29%: mean -26.98, sd 19.97
    assert any("3 seeds (0, 1, 2)" in n for n in t.notes)


def test_seeds_mixed_with_single_seed_methods_and_missing_seed(tmp_path):
    seeded = _seeded(SEEDS[:2])
    exp = _exp(tmp_path / "exp", {"seq-fft": seeded, "seq-lora": _res("seq-lora", SEQ, SEQ_ROWS)})
    (exp / "seq-fft" / "seed-2").mkdir()  # started, unfinished
    loaded = load_runs([exp])
    assert [r.label for r in loaded.runs] == ["seq-fft", "seq-lora"]
    assert ("seq-fft", "seed 2: no results.json") in loaded.skipped
    new = comparison_tables(loaded.runs)[0]
    assert new.rows[1][1] == "45.0 ± 7.1" and new.rows[2][1] == "50.0"


# ------------------------------------------------------------------ bootstrap and significance


def test_bootstrap_interval_contains_estimate_and_constant_has_zero_width():
    iv = bootstrap_ci([[1, 0] * 50])
    assert iv.estimate == 0.5 and iv.low < 0.5 < iv.high
    assert 0.35 < iv.low and iv.high < 0.65  # sd of a 100-item mean of p=.5 is 0.05
    c = bootstrap_ci([[1.0] * 10])
    assert (c.low, c.high) == (1.0, 1.0)
    assert paired_bootstrap([[1, 0, 1]], [[1, 0, 1]]).excludes_zero() is False
    assert paired_bootstrap([[1] * 40], [[0] * 40]).excludes_zero()


def _preds(d: Path, per_task: dict[str, list[bool]]):
    d.mkdir(parents=True, exist_ok=True)
    recs = {t: [{"prompt": f"q{i}", "reference": "yes", "prediction": "yes" if ok else "no"}
                for i, ok in enumerate(v)] for t, v in per_task.items()}
    (d / "predictions.json").write_text(json.dumps(recs))


def _seq_with_items(exp: Path, name: str, right_after: float, final: float, n: int = 60, **extra):
    """A sequential run on tasks a, b whose saved predictions give the matrix's scores exactly."""
    def flags(p):
        k = round(p * n)
        return [True] * k + [False] * (n - k)

    M = [[0.0, 0.0], [right_after, 0.0], [final, right_after]]
    _write(exp / name, _res(name, M, SEQ_ROWS, **extra))
    _preds(exp / name / "rounds" / "01-a", {"a": flags(right_after), "b": flags(0.0)})
    _preds(exp / name / "rounds" / "02-b", {"a": flags(final), "b": flags(right_after)})


def test_single_seed_cells_get_intervals_and_significance_marks(tmp_path):
    exp = tmp_path / "exp"
    _seq_with_items(exp, "m1", 0.9, 0.8)
    _seq_with_items(exp, "m2", 0.9, 0.3)
    _seq_with_items(exp, "m3", 0.9, 0.8)
    _preds(exp / "base", {"a": [False] * 60, "b": [False] * 60})
    (exp / "experiment.json").write_text(json.dumps({"methods": ["m1", "m2", "m3"]}))
    runs = load_runs([exp]).runs
    new = comparison_tables(runs)[0]
    assert new.rows[1][1].startswith("80.0 [") and new.rows[1][3].startswith("85.0 [")
    sig = {r[0]: r[2] for r in significance_table(runs).rows}
    assert sig == {"m1 − m2": "yes", "m1 − m3": "n.s.", "m2 − m3": "yes"}


# ------------------------------------------------------------------ findings


CONFIG = """
methods:
  - {name: seq-lora, trainable: lora}
  - {name: seq-fft, trainable: full}
  - {name: o-lora, trainable: lora, olora: {lambda1: 0.5}}
combine: []
"""


def _old(final, se=0.002):
    return {"tasks": ["arc", "piqa"], "metric": {}, "matrix": [[0.5, 0.6], None, final],
            "stderr": [[se, se], None, [se, se]]}


def test_findings_verdicts(tmp_path):
    exp = tmp_path / "exp"
    _seq_with_items(exp, "seq-lora", 0.9, 0.5, old=_old([0.5, 0.6]))     # forgets new a lot, keeps old
    _seq_with_items(exp, "seq-fft", 0.9, 0.8, old=_old([0.3, 0.4]))      # loses old knowledge
    _seq_with_items(exp, "o-lora", 0.9, 0.85)                             # same acquisition, less forgetting
    (exp / "experiment.json").write_text(json.dumps({"methods": ["seq-lora", "seq-fft", "o-lora"]}))
    (exp / "config.yaml").write_text(CONFIG)
    f = {x.claim: x for x in evaluate_findings(load_runs([exp]).runs)}
    lora_fft = f["LoRA forgets less old knowledge than FFT (sequential)"]
    assert lora_fft.verdict == "supports" and lora_fft.interval.startswith("+20.0 [")
    assert f["LoRA forgets less old knowledge than FFT (one-round)"].verdict == "not in this run"
    assert f["MoE mixing beats merging (semi-cooperative)"].verdict == "not in this run"
    assert f["O-LoRA interferes less than LoRA"].verdict == "supports"  # BWT -5 vs -40 points
    assert f["O-LoRA acquires less than LoRA"].verdict.startswith("cannot tell")  # equal acquisition
    # new knowledge, LoRA vs FFT: the same acquisition (0.9 each) cannot tell "more"; final averages
    # 0.5+0.9 vs 0.8+0.9 over 60 items a task differ, so "comparable" is contradicted
    assert f["LoRA acquires more new knowledge than FFT (sequential)"].verdict.startswith("cannot tell")
    assert f["LoRA acquires more new knowledge than FFT (sequential)"].interval.startswith("+0.0 [")
    comparable = f["LoRA and FFT end comparable on new knowledge (sequential)"]
    assert comparable.verdict == "contradicts (the two differ)" and comparable.interval.startswith("-15.0 [")
    assert f["LoRA and FFT end comparable on new knowledge (one-round)"].verdict == "not in this run"


def test_findings_contradiction(tmp_path):
    exp = tmp_path / "exp"
    _seq_with_items(exp, "seq-lora", 0.9, 0.5, old=_old([0.3, 0.4]))
    _seq_with_items(exp, "seq-fft", 0.9, 0.8, old=_old([0.5, 0.6]))
    (exp / "experiment.json").write_text(json.dumps({"methods": ["seq-lora", "seq-fft"]}))
    (exp / "config.yaml").write_text(CONFIG)
    f = {x.claim: x for x in evaluate_findings(load_runs([exp]).runs)}
    assert f["LoRA forgets less old knowledge than FFT (sequential)"].verdict == "contradicts"


def test_findings_comparable_new_knowledge_supported_when_the_interval_contains_zero(tmp_path):
    exp = tmp_path / "exp"
    _seq_with_items(exp, "seq-lora", 0.9, 0.7)   # final row (0.7, 0.9): average 0.8
    _seq_with_items(exp, "seq-fft", 0.7, 0.9)    # final row (0.9, 0.7): average 0.8
    (exp / "experiment.json").write_text(json.dumps({"methods": ["seq-lora", "seq-fft"]}))
    (exp / "config.yaml").write_text(CONFIG)
    f = {x.claim: x for x in evaluate_findings(load_runs([exp]).runs)}
    assert f["LoRA and FFT end comparable on new knowledge (sequential)"].verdict.startswith("supports")
    more = f["LoRA acquires more new knowledge than FFT (sequential)"]  # 0.9 vs 0.7 right after, 60 items a task
    assert more.verdict == "supports" and more.interval.startswith("+20.0 [")


def test_single_seed_old_knowledge_cells_get_normal_intervals(tmp_path):
    exp = _exp(tmp_path / "exp", {"seq-lora": _res("seq-lora", SEQ, SEQ_ROWS, SEQ_OLD),
                                  "only-lora": _res("only-lora", ONE, ONE_ROWS, ONE_OLD, strategy="one-round")})
    old = comparison_tables(load_runs([exp]).runs, old_intervals=True)[1]
    # se 0.01 per test: ±1.96 points; AVE se = sqrt(0.01² + 0.01²) / 2 = 0.00707: ±1.39 points
    assert old.rows[1] == ["seq-lora", "45.0 [43.0, 47.0]", "55.0 [53.0, 57.0]", "50.0 [48.6, 51.4]"]
    assert old.rows[2][1] == "35.0 [33.0, 37.0]"  # one-round: mean of models, mean of their se


def test_demo_config_has_64_test_questions_per_domain_and_old_knowledge():
    from cairn.commands.demo import demo_config_path, old_knowledge_source
    from cairn.config import load_config
    from cairn.data.demo import generate_domain

    cfg = load_config(demo_config_path())
    for t in cfg.tasks:
        assert len(generate_domain(t.path, seed=t.seed, entities=t.entities)["test"]) >= 64
    ok = cfg.evaluation.old_knowledge
    assert ok is not None and ok.when == "last" and ok.tasks == ["arc_easy", "piqa"]
    assert old_knowledge_source(Path("/x")) == Path("/x")


def test_summarize_seeds_on_hand_written_matrices():
    from cairn.errors import CairnError
    from cairn.eval.continual import summarize_seeds

    s = summarize_seeds(SEEDS, ["a", "b"], SEQ_ROWS)
    # last average per seed: 0.5, 0.6, 0.7 -> mean 0.6, sd 0.1; BWT (score units): -0.4, -0.1, -0.1
    assert s["last_average"]["mean"] == pytest.approx(0.6) and s["last_average"]["sd"] == pytest.approx(0.1)
    assert s["bwt"]["mean"] == pytest.approx(-0.2) and s["bwt"]["sd"] == pytest.approx(0.17320508)
    assert s["acquisition"][0]["mean"] == pytest.approx(0.7) and s["acquisition"][1]["n"] == 3
    assert len(s["seeds"]) == 3
    with pytest.raises(CairnError, match="differ in shape"):
        summarize_seeds([SEEDS[0], SEEDS[0][:2]], ["a", "b"])


def test_seeded_experiment_report_builds_with_error_bars(tmp_path):
    olds = [{"tasks": ["arc"], "metric": {}, "matrix": [[0.5], None, [0.4 + 0.01 * s]]} for s in range(3)]
    exp = _exp(tmp_path / "exp", {"seq-fft": _seeded(SEEDS, olds),
                                  "seq-lora": {s: _res("seq-lora", SEQ, SEQ_ROWS, SEQ_OLD, seed=s) for s in range(3)}})
    page = build_report([exp], tmp_path / "out")
    html = page.read_text()
    assert "± 10.0" in html and "Findings" in html
    md = (tmp_path / "out" / "tables" / "comparison_summary.md").read_text()
    assert "| seq-fft | 15.0 ± 0.0 | 60.0 ± 10.0 |" in md
    for name in ("acquisition.png", "bwt.png", "gain_new.png", "gain_old.png"):
        assert (tmp_path / "out" / "plots" / name).stat().st_size > 5000


def test_demo_summary_prints_intervals_significance_and_findings(tmp_path, capsys):
    from cairn.commands.demo import print_summary

    exp = tmp_path / "exp"
    _seq_with_items(exp, "seq-lora", 0.9, 0.5, old=_old([0.5, 0.6]))
    _seq_with_items(exp, "seq-fft", 0.9, 0.8, old=_old([0.3, 0.4]))
    _preds(exp / "base", {"a": [False] * 60, "b": [False] * 60})
    (exp / "experiment.json").write_text(json.dumps({"methods": ["seq-lora", "seq-fft"]}))
    (exp / "config.yaml").write_text(CONFIG)
    print_summary(exp, {"seq-lora": "ok", "seq-fft": "ok"})
    out = capsys.readouterr().out
    assert "| seq-lora | 50.0 [" in out and "| seq-fft | 30.0 [" in out  # new and old knowledge, with intervals
    assert "| seq-lora − seq-fft | -15.0 [" in out
    assert "LoRA forgets less old knowledge than FFT (sequential)" in out and "| supports |" in out


def test_seeds_with_different_rounds_are_a_user_error(tmp_path):
    from cairn.errors import CairnError

    runs = {0: _res("seq-fft", SEEDS[0], SEQ_ROWS, seed=0), 1: _res("seq-fft", SEEDS[1][:2], SEQ_ROWS[:2], seed=1)}
    exp = _exp(tmp_path / "exp", {"seq-fft": runs})
    with pytest.raises(CairnError, match="different tasks or rounds"):
        load_runs([exp])
