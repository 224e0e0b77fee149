"""configs/paper/: the seed paper's curriculum, metrics that exist, settings that load; the CPU variant runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cairn.config import ExperimentConfig, TaskConfig, config_from_dict
from cairn.eval.metrics import METRICS

PAPER = Path(__file__).parents[1] / "configs" / "paper"
FULL = sorted(p for p in PAPER.glob("*.yaml") if p.name != "cpu.yaml")
ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "20Minuten", "math"]
# keys the task/experiment schema gains in the same change (train/test sources, several metrics, seeds)
NEW_TASK_KEYS = {"train_path", "test_path", "metrics"}
NEW_TOP_KEYS = {"seeds"}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _loadable(data: dict) -> dict:
    """The config with keys this checkout's schema does not know yet folded into ones it does."""
    data = dict(data)
    for key in NEW_TOP_KEYS - _fields(ExperimentConfig):
        data.pop(key, None)
    tasks = []
    for t in data["tasks"]:
        t = dict(t)
        missing = NEW_TASK_KEYS - _fields(TaskConfig)
        if "metrics" in missing and "metrics" in t:
            t["metric"] = t.pop("metrics")[0]
        for key in missing:
            t.pop(key, None)
        tasks.append(t)
    data["tasks"] = tasks
    return data


def test_there_is_a_config_per_table_and_figure():
    names = {p.name for p in FULL}
    assert names == {"one-round.yaml", "sequential.yaml", "olora.yaml", "semi-cooperative.yaml",
                     "fully-cooperative.yaml", "extensions.yaml"}


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.name)
def test_paper_configs_follow_the_paper(path):
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert [t["name"] for t in data["tasks"]] == ORDER
    assert data["model"] == "meta-llama/Meta-Llama-3-8B"
    assert data["training"]["lr"] == 2.0e-5 and data["training"]["scheduler"] == "constant"
    assert "MeetingBank/train.json" in text  # the config says the pack lacks it
    math = data["tasks"][-1]
    assert math["test_path"] == "gsm8k" and math["metrics"][0] == "gsm8k_strict"
    meeting = data["tasks"][2]
    assert meeting["metrics"][0] == "rouge_l_trace"
    ok = data["evaluation"]["old_knowledge"]
    assert ok["tasks"] == ["mmlu", "arc_challenge", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "winogrande"]
    assert ok["limit"] is None
    for t in data["tasks"]:
        for m in t.get("metrics") or [t.get("metric")]:
            assert m in METRICS, f"{path.name}: {t['name']} names unknown metric {m!r}"
    cfg = config_from_dict(_loadable(data), str(path))
    assert [m.name for m in cfg.methods]


def test_semi_cooperative_lora_average_is_mean_delta_w():
    data = yaml.safe_load((PAPER / "semi-cooperative.yaml").read_text())
    comb = {c["name"]: c for c in data["combine"]}
    assert comb["merge-lora"]["lora_mode"] == "full" and comb["merge-lora"]["method"] == "linear"
    assert comb["ties-lora"]["lora_mode"] == "per_factor" and comb["ties-lora"]["params"]["density"] == 0.2


def test_cpu_variant_is_small_and_loads():
    data = yaml.safe_load((PAPER / "cpu.yaml").read_text())
    assert data["model"] == "smollm2-135m" and data["seeds"] == [0, 1, 2]
    assert sum(t["max_train"] for t in data["tasks"]) <= 400
    # the paper's order, less MeetingBank (no train file in the pack) and the two long-prompt tasks
    assert [t["name"] for t in data["tasks"]] == [n for n in ORDER if n not in ("MeetingBank", "Py150", "20Minuten")]
    config_from_dict(_loadable(data), "cpu.yaml")


@pytest.mark.integration
def test_cpu_variant_runs_end_to_end(data_dir, tmp_path):
    """The CPU-sized paper run on the built-in model, one seed and a smaller test set, with its report."""
    if not NEW_TASK_KEYS <= _fields(TaskConfig):
        pytest.skip("this checkout's TaskConfig has no train_path/test_path/metrics yet")
    from cairn.config import load_config
    from cairn.experiment import run_experiment

    sets = [f"data_dir={data_dir}", "evaluation.old_knowledge.data_dir=" + str(data_dir)]
    # CI-sized: the pipeline end to end (every task, both methods, old knowledge, report), not the numbers
    sets += [f"tasks.{i}.max_test=4" for i in range(4)] + [f"tasks.{i}.max_train=8" for i in range(4)]
    sets += ["training.max_steps=1", "training.batch_size=4", "evaluation.old_knowledge.limit=8"]
    if "seeds" in _fields(ExperimentConfig):
        sets.append("seeds=[0]")
    cfg = load_config(PAPER / "cpu.yaml", sets)
    out = run_experiment(cfg, tmp_path / "paper-cpu", progress=False)
    # with a seeds list a method's status is {seed: status}
    statuses = [v for st in out["status"].values() for v in (st.values() if isinstance(st, dict) else [st])]
    assert statuses and set(statuses) == {"ok"}
    from cairn.report import build_report

    page = build_report([tmp_path / "paper-cpu"])
    assert "Findings" in page.read_text()
