"""Model projects (cairn.ledger): chain of contributions, lineage, diff, report, concurrency, gate, bad input.

Everything runs on the tiny Llama of conftest.py; adapters are built with PEFT directly (random B so
they change the weights), full models by nudging the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from cairn.cli import main
from cairn.ledger import db
from cairn.ledger.gate import Policy, decide
from cairn.ledger.project import open_project
from conftest import write_arc_easy_subset

REPO = Path(__file__).resolve().parents[1]


def probe_file(path: Path, tag: str, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag} {i}?", "answer": f"{tag}{i}"}) + "\n" for i in range(n)))
    return path


def make_adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter on ``base_dir`` with non-zero B (so merging it changes the weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(0.01 * torch.randn_like(p))
    peft.save_pretrained(str(out))
    return out


def make_full(base_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


def dump(project_dir: Path) -> dict:
    """Every row of every ledger table (to prove a refused command changed nothing)."""
    engine = db.make_engine(f"sqlite:///{project_dir / 'ledger.db'}")
    with engine.connect() as conn:
        out = {t.name: [tuple(r) for r in conn.execute(sa.select(t))] for t in db.metadata.sorted_tables}
    engine.dispose()
    return out


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    p = tmp_path / "proj"
    assert cli("init", p, "--base", tiny_model_dir, "--max-drop", 10, "--set", "training.max_steps=1",
               "--set", "training.batch_size=2") == 0
    return p


def test_four_contribution_chain_lineage_diff_report(project, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"x{i}", "answer": f"y{i}"}) + "\n" for i in range(4)))
    assert cli("contribute", project, "--name", "c1", "--from", "base", "--data", data, "--contributor", "ana",
               "--probe", probe_file(tmp_path / "p1.jsonl", "one"), "--probe-metric", "exact_match", "--no-progress") == 0
    assert cli("ledger", "export", project, "c1", "--out", tmp_path / "e1") == 0
    ad = make_adapter(tmp_path / "e1", tmp_path / "a2", seed=2)
    assert cli("contribute", project, "--name", "c2", "--from", "c1", "--adapter", ad, "--contributor", "bo",
               "--probe", probe_file(tmp_path / "p2.jsonl", "two"), "--probe-metric", "exact_match",
               "--fingerprint-data", data) == 0
    assert cli("ledger", "export", project, "c2", "--out", tmp_path / "e2") == 0
    full = make_full(tmp_path / "e2", tmp_path / "m3", seed=3)
    assert cli("contribute", project, "--name", "c3", "--from", "c2", "--model", full, "--contributor", "cy",
               "--probe", probe_file(tmp_path / "p3.jsonl", "three"), "--probe-metric", "exact_match") == 0
    assert cli("ledger", "export", project, "c3", "--out", tmp_path / "e3") == 0
    ad4 = make_adapter(tmp_path / "e3", tmp_path / "a4", seed=4)
    assert cli("contribute", project, "--name", "c4", "--from", "c3", "--adapter", ad4, "--contributor", "di",
               "--probe", probe_file(tmp_path / "p4.jsonl", "four"), "--probe-metric", "exact_match") == 0

    proj = open_project(project)
    assert [r.name for r in proj.lineage(proj.release("c4"))] == ["base", "c1", "c2", "c3", "c4"]
    contribs = {c.name: c for c in proj.contributions()}
    assert [contribs[n].mode for n in ("c1", "c2", "c3", "c4")] == ["data", "adapter", "model", "adapter"]
    assert contribs["c1"].data_fingerprint["counts"] == {"train": 4}
    assert contribs["c2"].data_fingerprint["counts"] == {"train": 4}  # hashed locally, never stored
    assert contribs["c4"].data_fingerprint is None
    # every later release is scored on every earlier probe set (and its own)
    probes = {p.id: p.name for p in proj.probes()}
    c4 = proj.release("c4")
    assert sorted(probes[e.probe_id] for e in proj.evaluations() if e.release_id == c4.id) == ["c1", "c2", "c3", "c4"]
    assert [t["probe"] for t in c4.gate["table"]] == ["c1", "c2", "c3", "c4"]

    capsys.readouterr()
    assert cli("ledger", "tree", project) == 0
    tree = capsys.readouterr().out.splitlines()
    assert [line.strip("└─├│ ").split(" [")[0] for line in tree] == ["base", "c1", "c2", "c3", "c4"]
    assert cli("ledger", "diff", project, "c1", "c4") == 0
    diff = capsys.readouterr().out
    assert "c1 " in diff and "not scored on both" in diff  # c1 was not scored on c4's later probe sets
    assert cli("ledger", "show", project, "c4") == 0
    assert "base -> c1 -> c2 -> c3 -> c4" in capsys.readouterr().out
    assert cli("ledger", project) == 0
    listing = capsys.readouterr().out
    assert all(f"\n  {n} " in listing for n in ("c1", "c2", "c3", "c4"))

    assert cli("ledger", "report", project, "--out", tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("<rect") == 5 and page.count("<path") == 4  # 5 releases, 4 parent->child edges
    assert "src=" not in page and "<script" not in page  # self-contained
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not on PATH (apt-get install chromium) - cannot check the page renders")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1200,1600", (tmp_path / "r.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000


def test_gate_rejects_a_real_drop_and_keeps_noise_and_small_drops():
    pol = Policy(max_drop=10.0, bootstrap=1000)
    forgot = decide([{"probe": "a", "metric": "em", "parent": [1.0] * 20, "release": [0.0] * 20}], pol)
    assert forgot["status"] == "rejected" and forgot["table"][0]["verdict"] == "fail"
    small = decide([{"probe": "a", "metric": "em", "parent": [1.0] * 20, "release": [1.0] * 19 + [0.0]}], pol)
    assert small["status"] == "accepted"  # -5 points, inside the 10-point threshold
    noisy = decide([{"probe": "a", "metric": "em", "parent": [1.0, 0.0, 1.0], "release": [0.0, 1.0, 0.0]}], pol)
    assert noisy["table"][0]["verdict"] == "noisy" and noisy["status"] == "flagged"  # -33 points on 3 items: noise
    flag = decide([{"probe": "a", "metric": "em", "parent": [1.0] * 20, "release": [0.0] * 20}],
                  Policy(max_drop=10.0, action="flag"))
    assert flag["status"] == "flagged"


def _fake_run(root: Path, base_dir: Path, t1_after_round2: list[bool], n: int = 20) -> Path:
    """A finished sequential run dir: round 1 learns t1, round 2 learns t2 and keeps t1 as given."""
    exp = root / "exp"
    items = {t: [{"prompt": f"{t} q{i}", "reference": f"{t}{i}"} for i in range(n)] for t in ("t1", "t2")}

    def preds(right: dict) -> dict:
        return {t: [dict(r, prediction=r["reference"] if right[t][i] else "no") for i, r in enumerate(items[t])]
                for t in items}

    none = [False] * n
    (exp / "base").mkdir(parents=True)
    (exp / "base" / "predictions.json").write_text(json.dumps(preds({"t1": none, "t2": none})))
    mdir = exp / "seq-lora"
    rounds = [("01-t1", {"t1": [True] * n, "t2": none}), ("02-t2", {"t1": t1_after_round2, "t2": [True] * n})]
    for k, (label, right) in enumerate(rounds):
        rdir = mdir / "rounds" / label
        rdir.mkdir(parents=True)
        make_adapter(base_dir, rdir / "adapter", seed=k)
        (rdir / "predictions.json").write_text(json.dumps(preds(right)))
        (rdir / "round.json").write_text(json.dumps({"label": label[3:], "scores": [], "train": {"seconds": 1.0}}))
    (mdir / "results.json").write_text(json.dumps({"name": "seq-lora", "method": "seq-lora", "model": str(base_dir),
                                                   "tasks": [{"name": "t1", "metric": "exact_match"},
                                                             {"name": "t2", "metric": "exact_match"}]}))
    return exp


@pytest.mark.parametrize("kept, status", [(0, "rejected"), (19, "accepted")])
def test_import_run_gate_rejects_forgetting_beyond_threshold(project, tmp_path, tiny_model_dir, kept, status, capsys):
    exp = _fake_run(tmp_path, tiny_model_dir, [True] * kept + [False] * (20 - kept))
    assert cli("ledger", "import", project, exp) == 0
    proj = open_project(project)
    r1, r2 = proj.release("exp-seq-lora-t1"), proj.release("exp-seq-lora-t2")
    assert r1.status == "accepted" and r2.parent_id == r1.id
    assert r2.status == status
    row = next(t for t in r2.gate["table"] if t["probe"] == "exp-seq-lora-t1")
    assert row["delta"] == pytest.approx(-5.0 * (20 - kept))  # points lost on t1's probe
    assert cli("ledger", "report", project) == 0
    assert status in (project / "report.html").read_text()


def test_tampered_artifact_is_refused(project, tmp_path, tiny_model_dir, capsys):
    ad = make_adapter(tiny_model_dir, tmp_path / "a1")
    assert cli("contribute", project, "--name", "c1", "--from", "base", "--adapter", ad,
               "--probe", probe_file(tmp_path / "p.jsonl", "p"), "--probe-metric", "exact_match") == 0
    proj = open_project(project)
    manifest = json.loads(proj.store.get_bytes(proj.release("c1").artifact_sha))
    obj = Path(proj.store.object_path(manifest["files"]["adapter_model.safetensors"]))
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one byte
    os.chmod(obj, 0o644)
    obj.write_bytes(bytes(raw))
    capsys.readouterr()
    assert cli("ledger", "export", project, "c1", "--out", tmp_path / "out") == 2
    assert "corrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _contrib_cmd(project: Path, name: str, adapter: Path, probe: Path) -> list[str]:
    return [sys.executable, "-m", "cairn.cli", "contribute", str(project), "--name", name, "--from", "base",
            "--adapter", str(adapter), "--probe", str(probe), "--probe-metric", "exact_match", "--no-progress"]


def _race(project: Path, tmp_path: Path, base_dir: Path, names: list[str]) -> list[subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    procs = []
    for i, name in enumerate(names):
        ad = make_adapter(base_dir, tmp_path / f"race-{i}", seed=10 + i)
        probe = probe_file(tmp_path / f"race-{i}.jsonl", f"r{i}")
        procs.append(subprocess.Popen(_contrib_cmd(project, name, ad, probe), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]


def _check_race(project: Path, tmp_path: Path, base_dir: Path) -> None:
    """Three contributors at once from one release: two distinct names and a third reusing one of them."""
    done = _race(project, tmp_path, base_dir, ["alpha", "beta", "beta"])
    codes = [d.returncode for d in done]
    assert codes[0] == 0 and sorted(codes[1:]) == [0, 2], [d.stderr[-2000:] for d in done]
    refused = next(d for d in done if d.returncode == 2)
    assert "'beta'" in refused.stderr and "Traceback" not in refused.stderr
    proj = open_project(project)
    assert sorted(r.name for r in proj.releases()) == ["alpha", "base", "beta"]
    assert sorted(c.name for c in proj.contributions()) == ["alpha", "beta"]
    assert sorted(p.name for p in proj.probes()) == ["alpha", "beta"]
    # nothing lost: each release holds its own evaluation and its contribution points at it
    for c in proj.contributions():
        assert proj.release(c.name).id == c.release_id
        assert any(e.release_id == c.release_id for e in proj.evaluations())


@pytest.mark.multiprocess
def test_two_processes_contribute_at_once_sqlite(project, tmp_path, tiny_model_dir):
    _check_race(project, tmp_path, tiny_model_dir)


@pytest.mark.multiprocess
def test_two_processes_contribute_at_once_postgresql(tmp_path, tiny_model_dir):
    try:
        import pgserver
        import psycopg  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no PostgreSQL for the test: {exc} (pip install pgserver 'psycopg[binary]')")
    import tempfile

    # Its own world-traversable folder: run as root, pgserver starts PostgreSQL as another system user,
    # which cannot enter pytest's private (0700) temporary folders.
    pgdata = Path(tempfile.mkdtemp(prefix="cairn-pg-"))
    pgdata.chmod(0o755)
    try:
        server = pgserver.get_server(str(pgdata / "data"), cleanup_mode="stop")
    except Exception as exc:  # noqa: BLE001 - any failure to start a server is a reason to skip
        shutil.rmtree(pgdata, ignore_errors=True)
        pytest.skip(f"pgserver could not start PostgreSQL here: {exc}")
    try:
        url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        project = tmp_path / "proj"
        assert cli("init", project, "--base", tiny_model_dir, "--db", url) == 0
        assert open_project(project).engine.dialect.name == "postgresql"
        _check_race(project, tmp_path, tiny_model_dir)
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- bad input


def _other_base(tmp_path: Path) -> Path:
    from conftest import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path / "other-base", seed=7)


BAD = {
    "missing parent": lambda p, t, b: ["--from", "nope", "--adapter", make_adapter(b, t / "a")],
    "adapter of another base": lambda p, t, b: ["--from", "base", "--adapter", make_adapter(_other_base(t), t / "a")],
    "adapter of another release": lambda p, t, b: ["--from", "base", "--adapter", _adapter_of_c1(p, t)],
    "probe without metric": lambda p, t, b: ["--from", "base", "--adapter", make_adapter(b, t / "a"), "--no-metric"],
    "probe without rows": lambda p, t, b: ["--from", "base", "--adapter", make_adapter(b, t / "a"), "--empty-probe"],
    "duplicate name": lambda p, t, b: ["--from", "base", "--adapter", make_adapter(b, t / "a"), "--name=c1"],
}


EXPECT = {"missing parent": "release 'nope' does not exist", "adapter of another base": "are not those of release",
          "adapter of another release": "was built on release 'c1'", "probe without metric": "needs a metric",
          "probe without rows": "has no rows", "duplicate name": "named 'c1' already exists"}


def _adapter_of_c1(project: Path, tmp_path: Path) -> Path:
    assert cli("ledger", "export", project, "c1", "--out", tmp_path / "e1") == 0
    return make_adapter(tmp_path / "e1", tmp_path / "a", seed=5)


@pytest.fixture
def project_with_c1(project, tmp_path, tiny_model_dir):
    ad = make_adapter(tiny_model_dir, tmp_path / "a0")
    assert cli("contribute", project, "--name", "c1", "--from", "base", "--adapter", ad,
               "--probe", probe_file(tmp_path / "p0.jsonl", "z"), "--probe-metric", "exact_match") == 0
    return project


@pytest.mark.parametrize("case", list(BAD))
def test_bad_contribution_is_refused_and_changes_nothing(case, project_with_c1, tmp_path, tiny_model_dir, capsys):
    args = BAD[case](project_with_c1, tmp_path, tiny_model_dir)
    name, metric, probe = "new", ["--probe-metric", "exact_match"], probe_file(tmp_path / "p.jsonl", "q")
    if "--no-metric" in args:
        args.remove("--no-metric")
        metric = []
    if "--empty-probe" in args:
        args.remove("--empty-probe")
        probe.write_text("\n")
    if "--name=c1" in args:
        args.remove("--name=c1")
        name = "c1"
    before = dump(project_with_c1)
    capsys.readouterr()
    assert cli("contribute", project_with_c1, "--name", name, "--probe", probe, *metric, *args) == 2
    err = capsys.readouterr().err
    # one message (transformers may print its weight-loading bar before it), no traceback
    assert err.count("cairn contribute: error: ") == 1 and "Traceback" not in err, err
    assert EXPECT[case] in err
    assert dump(project_with_c1) == before


def test_newer_schema_is_refused(project, capsys):
    engine = db.make_engine(f"sqlite:///{project / 'ledger.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    engine.dispose()
    before = dump(project)
    assert cli("ledger", project) == 2
    assert "newer than this cairn" in capsys.readouterr().err
    assert dump(project) == before


def test_unreachable_store_is_refused(project, tmp_path, capsys):
    cfg = json.loads((project / "cairn-project.json").read_text())
    cfg["store"] = str(tmp_path / "gone" / "store")
    (project / "cairn-project.json").write_text(json.dumps(cfg))
    before = dump(project)
    assert cli("ledger", project) == 2
    assert "unreachable" in capsys.readouterr().err
    assert dump(project) == before


def test_init_refuses_an_existing_project_and_a_bad_base(project, tmp_path, capsys):
    assert cli("init", project, "--base", "nowhere/at/all/model") == 2
    assert cli("init", tmp_path / "p2", "--base", tmp_path / "missing") == 2
    assert not (tmp_path / "p2").exists()


def test_store_round_trip_on_an_fsspec_url_and_tamper_detection(tmp_path):
    import fsspec

    from cairn.errors import CairnError
    from cairn.ledger.store import ArtifactStore

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 10)
    (src / "sub" / "b.txt").write_text("hello")
    store = ArtifactStore("memory://cairn-test-store", create=True)
    sha = store.put_dir(src)
    assert store.put_dir(src) == sha  # content-addressed: the same folder, the same name
    out = store.get_dir(sha, tmp_path / "out")
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes() and (out / "sub" / "b.txt").read_text() == "hello"
    manifest = json.loads(store.get_bytes(sha))
    fs = fsspec.filesystem("memory")
    victim = store.object_path(manifest["files"]["sub/b.txt"])
    fs.pipe(victim, b"hellO")
    with pytest.raises(CairnError, match="corrupted"):
        store.get_dir(sha, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    with pytest.raises(CairnError, match="unreachable"):
        ArtifactStore("memory://no-such-store")


def test_gate_includes_the_old_knowledge_subset(tmp_path, tiny_model_dir):
    write_arc_easy_subset(tmp_path / "data")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"max_drop: 20\nold_knowledge: {{tasks: [arc_easy], limit: 4, data_dir: {tmp_path / 'data'}}}\n")
    project = tmp_path / "proj"
    assert cli("init", project, "--base", tiny_model_dir, "--policy", policy) == 0
    ad = make_adapter(tiny_model_dir, tmp_path / "a")
    assert cli("contribute", project, "--name", "c1", "--from", "base", "--adapter", ad,
               "--probe", probe_file(tmp_path / "p.jsonl", "p"), "--probe-metric", "exact_match") in (0, 1)
    c1 = open_project(project).release("c1")
    row = next(t for t in c1.gate["table"] if t["probe"] == "old:arc_easy")
    assert row["n"] == 4 and row["metric"] == "acc_norm"
    assert len(c1.settings["old_knowledge"]["tasks"]["arc_easy"]["items"]) == 4  # kept for its children
    bad = tmp_path / "bad.yaml"
    bad.write_text("old_knowledge: {tasks: [arc_easy], limt: 4}\n")
    assert cli("init", tmp_path / "p2", "--base", tiny_model_dir, "--policy", bad) == 2


def test_merge_folds_sibling_adapters_into_one_gated_release(project_with_c1, tmp_path, tiny_model_dir, capsys):
    ad = make_adapter(tiny_model_dir, tmp_path / "a-sib", seed=9)
    assert cli("contribute", project_with_c1, "--name", "c2", "--from", "base", "--adapter", ad,
               "--probe", probe_file(tmp_path / "p2.jsonl", "s"), "--probe-metric", "exact_match") == 0
    assert cli("ledger", "merge", project_with_c1, "--name", "both", "--releases", "c1", "c2", "--method", "linear") == 0
    proj = open_project(project_with_c1)
    both = proj.release("both")
    assert both.kind == "merge" and proj.release_by_id(both.parent_id).name == "base"
    assert both.settings["sources"] == ["c1", "c2"]
    assert sorted(t["probe"] for t in both.gate["table"]) == ["c1", "c2"]  # gated on both contributors' probes
    assert cli("ledger", "export", project_with_c1, "both", "--out", tmp_path / "both") == 0  # it builds
    before = dump(project_with_c1)
    assert cli("ledger", "merge", project_with_c1, "--name", "x", "--releases", "c1", "nope") == 2
    assert cli("ledger", "merge", project_with_c1, "--name", "c2", "--releases", "c1", "both") == 2  # name taken
    assert dump(project_with_c1) == before


def test_cairn_run_records_its_rounds_into_a_project(project, tmp_path, tiny_model_dir, capsys):
    """`cairn run --ledger P`: each sequential round becomes a release of P, chained from the base and gated."""
    import yaml

    cfg = {"name": "w", "model": str(tiny_model_dir),
           "tasks": [{"name": t, "format": "demo", "path": t, "entities": 2, "max_new_tokens": 4}
                     for t in ("zoology", "geography")],
           "methods": [{"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4}, "diagnostics": False}],
           "training": {"max_steps": 1, "batch_size": 4, "max_length": 64}, "evaluation": {"batch_size": 8}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli("run", path, "--out", tmp_path / "exp", "--ledger", project, "--no-progress") == 0
    assert "ledger" in capsys.readouterr().out
    proj = open_project(project)
    r1, r2 = proj.release("w-lora-zoology"), proj.release("w-lora-geography")
    assert r2.parent_id == r1.id and r1.status in ("accepted", "flagged", "rejected")
    # a project that does not exist fails before anything runs
    assert cli("run", path, "--out", tmp_path / "exp2", "--ledger", tmp_path / "nope", "--no-progress") == 2
    assert not (tmp_path / "exp2").exists()
