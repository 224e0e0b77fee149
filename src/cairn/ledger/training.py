"""Train a fully cooperative contribution: one round of the project's method from the parent release.

The round is an experiment's round (the seed paper's fully cooperative setting, Lee & Wynter 2024,
arXiv 2410.13699): the method is composed by the registry (:func:`cairn.methods.registry.compose`)
from the project's method (:mod:`cairn.ledger.method`) and trained by the one training loop
(:func:`cairn.train.loop.train`). Contribution ``k`` is round ``k`` of its lineage (the base is round
0, the parent release round ``k - 1``). What a run directory would hand the method's parts, the
ledger supplies from the parent's lineage:

- O-LoRA (Wang et al. 2023, arXiv 2310.14152) is orthogonal to the LoRA subspaces of earlier
  rounds: the A factors of every adapter in the lineage, read from the artifact store, are written
  as the A stores of rounds 1..k-1 (releases that are full models have no subspace; modules the new
  adapter does not adapt cannot overlap with it and are left out, counted in the record);
- replay draws from earlier rounds' data: the training rows that the lineage's fully cooperative
  contributions stored (policy ``keep_data``), one earlier "task" per contribution.

Only the artifact is kept: the adapter (merged into the release's weights) or the full model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from cairn.errors import CairnError


@dataclass
class Trained:
    model: object  # the new release's model (an adapter merged in)
    kind: str  # adapter | model
    artifact: Path
    method: dict  # what the ledger records as the contribution's method


def lineage_contributions(project, release) -> list:
    """Contributions whose knowledge ``release`` holds: those of its lineage's releases (a merge release's
    through its sources), oldest first."""
    by_release: dict = {}
    for c in project.contributions():
        by_release.setdefault(c.release_id, []).append(c)
    out = []
    for r in project.lineage(release)[1:]:
        out += by_release.get(r.id, [])
        for src in (r.settings or {}).get("sources", []) if r.kind == "merge" else []:
            out += by_release.get(project.release(src).id, [])
    return out


def stored_data(project, release) -> list[tuple[str, str, list[dict]]]:
    """(contribution, data sha256, rows) of every lineage contribution that stored its training rows."""
    from cairn.ledger.contribute import json_rows

    out = []
    for c in lineage_contributions(project, release):
        fp = c.data_fingerprint or {}
        if fp.get("stored"):
            out.append((c.name, fp["sha256"], json_rows(project.store.get_bytes(fp["sha256"]))))
    return out


def _write_A_stores(project, chain: list, ctx, modules: set[str]) -> dict:
    """Rounds 1..k-1's O-LoRA A stores from the lineage's adapters; returns what was used."""
    from cairn.combine.moe_lora import read_lora_adapter
    from cairn.methods.olora import OLoRA, save_A_store

    used, dropped = [], 0
    with tempfile.TemporaryDirectory(prefix="cairn-olora-") as tmp:
        for i, r in enumerate(chain[1:], start=1):
            A = {}
            if r.artifact_kind == "adapter":
                every = read_lora_adapter(project.store.get_dir(r.artifact_sha, Path(tmp) / str(i))).A
                A = {m: a for m, a in every.items() if m in modules}
                dropped += len(every) - len(A)
                used.append(r.name)
            ctx.round_dir(i).mkdir(parents=True, exist_ok=True)
            save_A_store(ctx.round_dir(i) / OLoRA.STORE, {i: A} if A else {})
    return {"earlier_adapters": used, "modules_not_adapted_now": dropped}


def train_contribution(project, parent, model, tokenizer, name: str, examples: list[dict], out: Path, log,
                       progress: bool) -> Trained:
    """Train round k of the project's method from ``model`` (the parent release's, changed in place)."""
    from cairn.ledger.method import method_record, project_method
    from cairn.lora_factors import lora_factors
    from cairn.methods.lora import adapter_name, merge_adapters, save_adapter
    from cairn.methods.registry import RoundContext, compose, freeze
    from cairn.rundir import MethodDir
    from cairn.train.loop import train

    pm = project_method(project)
    method = compose(pm.config)
    chain = project.lineage(parent)
    k = len(chain)
    earlier = stored_data(project, parent) if pm.config.replay > 0 else []
    tasks = [SimpleNamespace(name=n, train=rows) for n, _, rows in earlier] + [SimpleNamespace(name=name, train=examples)]
    plan = [(r.name, []) for r in chain[1:]] + [(name, [len(earlier)])]
    mdir = MethodDir(out / "rounds-of-lineage")

    def no_base():  # a contribution starts from its parent release, never from the raw base
        raise CairnError("internal: a contribution round restores no earlier round")

    ctx = RoundContext(cfg=SimpleNamespace(seed=pm.seed, model=project.base), method=pm.config, k=k, label=name,
                       task_ids=[len(earlier)], rdir=mdir.round(k, name), mdir=mdir, tasks=tasks,
                       tokenizer=tokenizer, load_base=no_base, log=log, plan=plan)
    record = method_record(pm) | {"trained_by": "cairn", "round": k}
    model = method.prepare(model, ctx)
    if "olora" in method_parts(method):
        modules = set(lora_factors(model, adapter_name(k)))
        record["olora_lineage"] = _write_A_stores(project, chain, ctx, modules)
    data, data_record = method.round_examples(ctx)
    if pm.config.replay > 0:
        record["replay_from"] = _replayed(earlier, data_record.get("replay", []))
        if not earlier:
            log(f"replay: no contribution in the lineage of {parent.name} stored its data; nothing to replay")
    log(f"training {name} (round {k} of its lineage, {', '.join(method_parts(method)) or 'plain'} "
        f"{pm.config.trainable}) on {len(data)} examples")
    result = train(model, tokenizer, data, pm.training, seed=pm.seed + k, loss_parts=method.loss_parts(model, ctx),
                   log=log, progress=progress)
    record["train"] = {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                       "examples": len(data), "log": result.log}
    if pm.config.trainable == "lora":
        save_adapter(model, k, out / "adapter")
        return Trained(merge_adapters(model), "adapter", out / "adapter", record)
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return Trained(freeze(model), "model", out / "model", record)


def method_parts(method) -> list[str]:
    return [p.key for p in method.parts]


def _replayed(earlier: list, pairs: list) -> list[dict]:
    """Which stored rows a round replayed: per earlier contribution, its data's hash and the row indices."""
    rows: dict[int, list[int]] = {}
    for task, index in pairs:
        rows.setdefault(int(task), []).append(int(index))
    return [{"contribution": earlier[t][0], "data_sha256": earlier[t][1], "rows": idx} for t, idx in sorted(rows.items())]
