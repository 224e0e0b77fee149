"""Model projects, continued: the project's method for --data contributions (O-LoRA, N-LoRA, replay with
keep_data), the mix fold (routed LoRA-MoE releases), the import gate on old knowledge, and bad input.

Everything runs on the tiny Llama of conftest.py (character tokenizer), a step or two of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from cairn.ledger import db
from cairn.ledger.contribute import json_rows
from cairn.ledger.project import open_project
from test_ledger import _fake_run, cli, dump, make_adapter, make_full, probe_file
from conftest import write_arc_easy_subset


def data_dir(path: Path, tag: str, n: int = 4) -> Path:
    path.mkdir(parents=True)
    (path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"{tag} {i}?", "answer": f"{tag}{i}"}) + "\n"
                                              for i in range(n)))
    return path


def chain(tmp_path: Path, base: Path, tag: str, *init_args) -> Path:
    """A project with two --data contributions, c1 from base and c2 from c1."""
    p = tmp_path / tag
    assert cli("init", p, "--base", base, "--max-drop", 100, "--set", "training.max_steps=2",
               "--set", "training.batch_size=2", "--set", "training.lr=1e-3", *init_args) == 0
    for name, parent in (("c1", "base"), ("c2", "c1")):
        assert cli("contribute", p, "--name", name, "--from", parent, "--data", data_dir(tmp_path / tag / f"d-{name}", name),
                   "--probe", probe_file(tmp_path / f"{tag}-{name}.jsonl", name), "--probe-metric", "exact_match",
                   "--no-progress") == 0
    return p


def adapter_A(project: Path, release: str, tmp: Path) -> dict[str, torch.Tensor]:
    from cairn.combine.moe_lora import read_lora_adapter

    proj = open_project(project)
    return read_lora_adapter(proj.store.get_dir(proj.release(release).artifact_sha, tmp)).A


def method_of(project: Path, name: str) -> dict:
    return {c.name: c for c in open_project(project).contributions()}[name].method


def test_olora_and_nlora_contributions_train_with_their_loss_parts(tmp_path, tiny_model_dir):
    plain = chain(tmp_path, tiny_model_dir, "plain")
    olora = chain(tmp_path, tiny_model_dir, "olora", "--method", "olora", "--set", "olora.lambda1=0.5")
    nlora = chain(tmp_path, tiny_model_dir, "nlora", "--method", "nlora", "--set", "nlora.lam=1.0")

    first, second = method_of(olora, "c1"), method_of(olora, "c2")
    assert second["parts"] == ["olora"] and second["olora"]["lambda1"] == 0.5 and second["round"] == 2
    assert second["olora_lineage"]["earlier_adapters"] == ["c1"]
    # round 1 has no earlier subspace (the term is exactly 0); round 2 is penalised against c1's A's
    assert first["train"]["log"][-1]["olora_prev_rounds"] == 0 and first["train"]["log"][-1]["olora_orth"] == 0.0
    assert second["train"]["log"][-1]["olora_prev_rounds"] == 1 and second["train"]["log"][-1]["olora_orth"] > 0
    # c1 trains identically in both projects (no earlier adapter); c2's A's differ from plain LoRA's and
    # overlap less with c1's: with B = 0 at step 1 the A's get gradient from the O-LoRA term alone
    a1 = adapter_A(olora, "c1", tmp_path / "o1")
    assert all(torch.equal(a1[m], t) for m, t in adapter_A(plain, "c1", tmp_path / "p1").items())
    a_o, a_p = adapter_A(olora, "c2", tmp_path / "o2"), adapter_A(plain, "c2", tmp_path / "p2")
    assert max(float((a_o[m] - a_p[m]).abs().max()) for m in a_o) > 1e-4  # lr 1e-3 steps, far above rounding

    def overlap(a2):
        return sum(float((a1[m] @ a2[m].T).abs().sum()) for m in a2)

    assert overlap(a_o) < overlap(a_p)

    n2 = method_of(nlora, "c2")
    assert n2["parts"] == ["nlora"] and n2["nlora"]["lam"] == 1.0
    assert n2["train"]["log"][-1]["nlora_l1"] > 0  # B != 0 from step 2 on: the L1 term is in the loss
    a_n = adapter_A(nlora, "c2", tmp_path / "n2")
    assert max(float((a_n[m] - a_p[m]).abs().max()) for m in a_p) > 1e-4


def test_replay_draws_the_earlier_contributions_stored_rows(tmp_path, tiny_model_dir):
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_drop: 100\nkeep_data: true\nmethod: {trainable: lora, replay: 0.5}\n")
    p = chain(tmp_path, tiny_model_dir, "replay", "--policy", policy)
    proj = open_project(p)
    cs = {c.name: c for c in proj.contributions()}
    fp1 = cs["c1"].data_fingerprint
    assert fp1["stored"] is True
    stored = json_rows(proj.store.get_bytes(fp1["sha256"]))
    assert stored == [json.loads(line) for line in (tmp_path / "replay" / "d-c1" / "train.jsonl").read_text().splitlines()]
    (replayed,) = cs["c2"].method["replay_from"]
    # 0.5 x 4 rows of c2 = 2 rows drawn from c1's stored data (and only from it)
    assert replayed["contribution"] == "c1" and replayed["data_sha256"] == fp1["sha256"]
    assert len(replayed["rows"]) == 2 and len(set(replayed["rows"])) == 2 and all(0 <= i < 4 for i in replayed["rows"])
    assert cs["c2"].method["train"]["examples"] == 6
    assert cs["c1"].method["replay_from"] == []  # nothing earlier to replay in round 1

    # semi-cooperative contributions never store data, even in a project that keeps data
    assert cli("ledger", "export", p, "c2", "--out", tmp_path / "e2") == 0
    d3 = data_dir(tmp_path / "d3", "three")
    assert cli("contribute", p, "--name", "c3", "--from", "c2", "--adapter", make_adapter(tmp_path / "e2", tmp_path / "a3"),
               "--probe", probe_file(tmp_path / "p3.jsonl", "three"), "--probe-metric", "exact_match",
               "--fingerprint-data", d3) == 0
    fp3 = {c.name: c for c in open_project(p).contributions()}["c3"].data_fingerprint
    assert "stored" not in fp3 and not proj.store.has(fp3["sha256"])


REFUSED_INIT = {
    "replay without keep_data": (["--set", "replay=0.1"], "does not keep data"),
    "unknown method in the policy": (["--policy", "method: sparse-lora\n"], "unknown method 'sparse-lora'"),
    "O-LoRA on a full-FT project": (["--method", "full", "--set", "olora.lambda1=0.5"], "O-LoRA constrains LoRA"),
    "O-LoRA on full in the policy": (["--policy", "method: {trainable: full, olora: {lambda1: 0.5}}\n"],
                                     "O-LoRA constrains LoRA"),
    "misspelt part setting": (["--policy", "method: {trainable: lora, olora: {lamda1: 1}}\n"], "did you mean 'lambda1'"),
    "unsupported part": (["--policy", "method: {trainable: full, ewc: {lam: 1}}\n"], "not supported for contributions"),
    "method twice": (["--method", "lora", "--policy", "method: nlora\n"], "given twice"),
}


@pytest.mark.parametrize("case", list(REFUSED_INIT))
def test_bad_project_method_is_refused_and_creates_nothing(case, tmp_path, tiny_model_dir, capsys):
    args, expect = REFUSED_INIT[case]
    if "--policy" in args:
        i = args.index("--policy")
        (tmp_path / "policy.yaml").write_text(args[i + 1])
        args = args[:i + 1] + [tmp_path / "policy.yaml"] + args[i + 2:]
    capsys.readouterr()
    assert cli("init", tmp_path / "proj", "--base", tiny_model_dir, *args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err
    assert not (tmp_path / "proj").exists()


def test_a_hand_edited_method_is_refused_before_training(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "proj"
    assert cli("init", p, "--base", tiny_model_dir) == 0
    engine = db.make_engine(f"sqlite:///{p / 'ledger.db'}")
    with engine.begin() as conn:
        method = conn.execute(sa.select(db.meta.c.value).where(db.meta.c.key == "method")).scalar_one()
        conn.execute(sa.update(db.meta).where(db.meta.c.key == "method").values(
            value=dict(method, trainable="full", olora={"lambda1": 0.5})))
    engine.dispose()
    before = dump(p)
    capsys.readouterr()
    assert cli("contribute", p, "--name", "c1", "--from", "base", "--data", data_dir(tmp_path / "d", "x"),
               "--probe", probe_file(tmp_path / "p.jsonl", "x"), "--probe-metric", "exact_match") == 2
    assert "O-LoRA constrains LoRA" in capsys.readouterr().err
    assert dump(p) == before


# ---------------------------------------------------------------------------------------------- mix fold


def routed_share(model, tokenizer, prompts: list[str], expert: int) -> float:
    """Mean gate of ``expert`` over every token of ``prompts`` and every routed module."""
    from cairn.routed_lora import routed_layers

    shares = []
    with torch.no_grad():
        for prompt in prompts:
            model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]))
            shares += [float(layer.last_routing_weights[0, :, expert].mean()) for layer in routed_layers(model).values()]
    return sum(shares) / len(shares)


def words_probe(path: Path, words: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{w} {w}?", "answer": w[::-1]}) + "\n" for w in words))
    return path


def test_mix_fold_routes_each_contributions_probe_to_its_expert(tmp_path, tiny_model_dir, capsys):
    from cairn.ledger.weights import build_release, fingerprint_model
    from cairn.models import load_tokenizer

    p = tmp_path / "proj"
    assert cli("init", p, "--base", tiny_model_dir, "--max-drop", 100) == 0
    probes = {"ca": ["zebra", "quokka", "walrus", "jackal", "vulture", "mink"],  # lowercase: contribution A
              "cb": ["OSLO", "DAKAR", "LIMA", "QUITO", "HANOI", "RIGA"],  # uppercase and digits: contribution B
              "cc": ["1234", "5678", "9012", "3456"]}
    for i, (name, words) in enumerate(probes.items()):
        assert cli("contribute", p, "--name", name, "--from", "base", "--adapter",
                   make_adapter(tiny_model_dir, tmp_path / f"a-{name}", seed=20 + i),
                   "--probe", words_probe(tmp_path / f"{name}.jsonl", words), "--probe-metric", "exact_match") == 0
    assert cli("ledger", "mix", p, "--name", "ab", "--releases", "ca", "cb", "--router-steps", 40) == 0
    assert "LoRA mixture of ca, cb" in capsys.readouterr().out
    proj = open_project(p)
    ab = proj.release("ab")
    assert (ab.kind, ab.artifact_kind, ab.settings["host"]) == ("mix", "lora-moe", "base")
    assert proj.release_by_id(ab.parent_id).name == "base"
    assert [e["probes"] for e in ab.settings["experts"]] == [["ca"], ["cb"]]
    assert sorted(t["probe"] for t in ab.gate["table"]) == ["ca", "cb", "cc"]  # gated on every live probe set
    # the release loads again from the store: the very weights that were gated
    model = build_release(proj, ab)
    assert fingerprint_model(model) == ab.settings["weights_sha256"]
    assert ab.settings["router"]["last"]["router_label_accuracy"] > 0.5  # tokens routed to their own expert
    tok = load_tokenizer(proj.base)
    for expert, name in enumerate(("ca", "cb")):
        share = routed_share(model, tok, [f"{w} {w}?" for w in probes[name]], expert)
        assert share > 0.6, (name, share)  # chance is 0.5 with two experts

    # adding an expert to the mixture: the new release builds on it and is gated against it
    assert cli("ledger", "mix", p, "--name", "abc", "--releases", "ab", "cc", "--router-steps", 40) == 0
    proj = open_project(p)
    abc = proj.release("abc")
    assert proj.release_by_id(abc.parent_id).name == "ab" and abc.settings["host"] == "base"
    assert [e["release"] for e in abc.settings["experts"]] == ["ca", "cb", "cc"]
    assert sorted(t["probe"] for t in abc.gate["table"]) == ["ca", "cb", "cc"]
    assert cli("ledger", "export", p, "abc", "--out", tmp_path / "abc") == 0
    assert json.loads((tmp_path / "abc" / "lora-moe" / "lora_moe.json").read_text())["num_experts"] == 3
    assert cli("ledger", "report", p, "--out", tmp_path / "r.html") == 0

    # bad input: nothing is recorded
    assert cli("ledger", "export", p, "base", "--out", tmp_path / "eb") == 0
    assert cli("contribute", p, "--name", "cm", "--from", "base", "--model", make_full(tmp_path / "eb", tmp_path / "m"),
               "--probe", probe_file(tmp_path / "pm.jsonl", "m"), "--probe-metric", "exact_match") == 0
    before = dump(p)
    capsys.readouterr()
    assert cli("ledger", "mix", p, "--name", "x", "--releases", "ca", "cm") == 2
    assert "full models" in capsys.readouterr().err
    assert cli("ledger", "mix", p, "--name", "x", "--releases", "ab", "abc") == 2  # two mixtures
    assert cli("ledger", "mix", p, "--name", "x", "--releases", "ab", "ca") == 2  # ca is already an expert
    assert cli("contribute", p, "--name", "y", "--from", "ab", "--adapter", make_adapter(tiny_model_dir, tmp_path / "ay"),
               "--probe", probe_file(tmp_path / "py.jsonl", "y"), "--probe-metric", "exact_match") == 2
    assert "is a LoRA mixture" in capsys.readouterr().err
    assert dump(p) == before


# ---------------------------------------------------------------------------------------------- import gate


def _with_old_knowledge(exp: Path, parent: list[float], after: list[list[float]], items: bool) -> None:
    """Old-knowledge results (arc_easy) in a fake run's base and rounds: aggregates, and items if asked."""
    dirs = [exp / "base"] + sorted((exp / "seq-lora" / "rounds").iterdir())
    for d, scores in zip(dirs, [parent] + after):
        rec = json.loads((d / "round.json").read_text()) if (d / "round.json").is_file() else \
            {"label": "base", "scores": [0.0, 0.0]}
        rec["old_knowledge"] = {"arc_easy": {"primary": sum(scores) / len(scores), "primary_stderr": 0.1,
                                             "primary_metric": "acc_norm", "n": len(scores)}}
        (d / "round.json").write_text(json.dumps(rec))
        if items:
            (d / "old_knowledge_items.json").write_text(json.dumps({"arc_easy": scores}))


@pytest.mark.parametrize("items", [False, True])
def test_import_gate_on_old_knowledge_uses_items_or_flags_aggregates(tmp_path, tiny_model_dir, items, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_drop: 10\nold_knowledge: {tasks: [arc_easy, piqa], limit: 20}\n")
    p = tmp_path / "proj"
    assert cli("init", p, "--base", tiny_model_dir, "--policy", policy) == 0
    exp = _fake_run(tmp_path, tiny_model_dir, [True] * 20)
    # round 1 keeps old knowledge; round 2 forgets it (20 questions right -> 10)
    _with_old_knowledge(exp, [1.0] * 20, [[1.0] * 20, [1.0] * 10 + [0.0] * 10], items)
    assert cli("ledger", "import", p, exp) == 0
    proj = open_project(p)
    r1, r2 = proj.release("exp-seq-lora-t1"), proj.release("exp-seq-lora-t2")
    row1 = next(t for t in r1.gate["table"] if t["probe"] == "old:arc_easy")
    row2 = next(t for t in r2.gate["table"] if t["probe"] == "old:arc_easy")
    piqa = next(t for t in r2.gate["table"] if t["probe"] == "old:piqa")
    assert piqa["verdict"] == "unscored" and "did not score piqa" in piqa["note"]  # asked for, never run: flagged
    assert row2["delta"] == pytest.approx(-50.0)
    if items:
        assert row1["verdict"] == "ok" and row1["lo"] == 0.0 and row1["hi"] == 0.0
        assert row2["verdict"] == "fail" and row2["hi"] < 0 and r2.status == "rejected"
    else:
        # only aggregates: no interval, never accepted on them (and never rejected without items)
        assert row1["verdict"] == row2["verdict"] == "aggregate" and row2["lo"] is None
        assert r1.status == r2.status == "flagged"
    assert r1.status != "accepted"  # piqa's unscored row flags it either way
    capsys.readouterr()
    assert cli("ledger", "show", p, "exp-seq-lora-t2") == 0
    shown = capsys.readouterr().out
    assert ("no items" in shown) != items and "unscored" in shown
    assert cli("ledger", "report", p, "--out", tmp_path / "r.html") == 0


def test_a_run_saves_old_knowledge_items_and_its_import_is_gated_on_them(tmp_path, tiny_model_dir):
    import yaml

    write_arc_easy_subset(tmp_path / "data")
    ok = {"tasks": ["arc_easy"], "limit": 4, "data_dir": str(tmp_path / "data")}
    cfg = {"name": "w", "model": str(tiny_model_dir),
           "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                     for t in ("zoology", "geography")],
           "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}, "diagnostics": False}],
           "training": {"max_steps": 1, "batch_size": 4, "max_length": 96},
           "evaluation": {"batch_size": 8, "old_knowledge": ok}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli("run", path, "--out", tmp_path / "exp", "--no-progress") == 0
    rdir = next((tmp_path / "exp" / "lora" / "rounds").iterdir())
    items = json.loads((rdir / "old_knowledge_items.json").read_text())
    assert len(items["arc_easy"]) == 4 and set(items["arc_easy"]) <= {0.0, 1.0}
    assert "items" not in json.loads((rdir / "round.json").read_text())["old_knowledge"]["arc_easy"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"max_drop": 100, "old_knowledge": ok}))
    assert cli("init", tmp_path / "proj", "--base", tiny_model_dir, "--policy", policy) == 0
    assert cli("ledger", "import", tmp_path / "proj", tmp_path / "exp") == 0
    for r in open_project(tmp_path / "proj").releases()[1:]:
        row = next(t for t in r.gate["table"] if t["probe"] == "old:arc_easy")
        assert row["n"] == 4 and row["lo"] is not None and row["verdict"] == "ok"
