"""Fold by mixing: LoRA adapter releases become the experts of a routed LoRA-MoE release.

The seed paper (Lee & Wynter 2024, arXiv 2410.13699) folds semi-cooperative contributions into one
model by merging or by MoE mixing (moetify, Lee et al. 2024, arXiv 2408.17280). Here the experts are
adapter releases built on one host release H (sequential contributions, merges, imports; the
adapter of each applies to H's weights), and optionally one earlier mix release on H whose experts
are kept: adding experts to a MoE release. The new release's parent is that mix release (so the gate
compares with the mixture it extends), else H. Each adapted linear becomes a
:class:`cairn.routed_lora.RoutedLoRALinear` (:func:`cairn.combine.moe_lora.build_lora_moe`).

Routers: each expert is labelled by the probe sets of its contribution(s). Its router row starts as
the mean input of its probe prompts (moetify's "positive prompts" initialisation); then only the
routers train, with the one loop (:func:`cairn.train.loop.train`), on the probe rows with
:class:`cairn.combine.router_training.RouterLabelLoss` (every token of expert e's rows should route to
e) next to the loop's answer loss. The routers thus see the probe questions the gate scores: they are
a few K x d matrices told only which expert a question belongs to, the price of labelled routing.

The release's artifact is the mixture folder (:func:`cairn.combine.moe_lora.save_lora_moe`: manifest,
routers, experts as PEFT adapters), content-addressed in the store; ``build_release`` loads it on the
host's weights for later evaluations and gates. Only LoRA adapters mix here: full-model experts
(Mixtral format, :mod:`cairn.combine.moe_fft`) are refused with a pointer to ``cairn mix``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cairn.errors import CairnError
from cairn.ledger.weights import MIX_KIND, build_release, fingerprint_model


def expert_probes(project, release) -> list[str]:
    """Names of the probe sets that label ``release`` as an expert: its contribution's, or its sources'."""
    by_release: dict = {}
    for c in project.contributions():
        by_release.setdefault(c.release_id, []).append(c.id)
    ids = list(by_release.get(release.id, []))
    if release.kind == "merge":
        for src in (release.settings or {}).get("sources", []):
            ids += by_release.get(project.release(src).id, [])
    names = [p.name for p in project.probes() if p.contribution_id in ids]
    if not names:
        raise CairnError(f"release {release.name!r} has no probe set to label it as an expert (a release made by "
                         "`cairn ledger merge` of releases without probe sets?); mix contributions' releases")
    return names


def _experts(project, rels: list) -> tuple[object, object, list[dict]]:
    """(host, parent, experts [{release, sha, dir, probes}]) of a mix of ``rels``, checked."""
    full = [r.name for r in rels if r.artifact_kind == "model"]
    if full:
        raise CairnError(f"release(s) {', '.join(full)} are full models; a mix fold mixes LoRA adapter releases into "
                         "a routed LoRA-MoE. Full-model experts (Mixtral format) are not supported in a project: mix "
                         "them outside it with `cairn mix --base B --experts M1 M2 ...`, or fold them sequentially")
    bare = [r.name for r in rels if r.artifact_kind is None]
    if bare:
        raise CairnError(f"release(s) {', '.join(bare)} have no adapter to mix (the base release); mix adapter releases")
    mixes = [r for r in rels if r.artifact_kind == MIX_KIND]
    if len(mixes) > 1:
        raise CairnError(f"releases {', '.join(r.name for r in mixes)} are all mixtures; give at most one (the mixture "
                         "to add experts to) and adapter releases")
    for m in mixes:
        if m.status == "rejected":
            raise CairnError(f"mixture {m.name!r} was rejected by the gate; add experts to an accepted mixture or mix "
                             "its experts' releases again")
    hosts = {}
    for r in rels:
        hosts[r.name] = project.release(r.settings["host"]).id if r.artifact_kind == MIX_KIND else r.parent_id
    if len(set(hosts.values())) != 1:
        listing = ", ".join(f"{n} on {project.release_by_id(h).name}" for n, h in hosts.items())
        raise CairnError(f"the experts of a mixture must apply to one release's weights; here {listing}. Mix "
                         "adapter releases made from the same release (and a mixture on that release)")
    host = project.release_by_id(next(iter(hosts.values())))
    experts = []
    for m in mixes:
        experts += [dict(e, sha=m.artifact_sha, dir=f"experts/{i}") for i, e in enumerate(m.settings["experts"])]
    for r in rels:
        if r.artifact_kind == "adapter":
            experts.append({"release": r.name, "sha": r.artifact_sha, "dir": None, "probes": expert_probes(project, r)})
    names = [e["release"] for e in experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CairnError(f"release(s) {', '.join(dup)} would be an expert twice; the mixture already holds them")
    return host, (mixes[0] if mixes else host), experts


def _router_labels(tokenizer, per_expert: list[list[dict]], max_length: int) -> tuple[list[dict], dict]:
    """The router examples (every probe row) and {encoded ids: expert}; a row two experts share is left unlabelled."""
    from cairn.data.encode import encode_example

    examples, labels, clash = [], {}, set()
    for e, rows in enumerate(per_expert):
        for row in rows:
            key = tuple(encode_example(tokenizer, row, max_length).input_ids)
            if labels.get(key, e) != e:
                clash.add(key)
            labels[key] = e
            examples.append(row)
    for key in clash:
        labels[key] = -1
    return examples, labels


def mix_releases(project, name: str, sources: list[str], *, top_k: int | None = None, steps: int = 50,
                 lr: float = 5e-3, progress: bool = False, log=print) -> dict:
    """A release mixing the adapters of ``sources`` (and the experts of at most one mixture) as routed experts."""
    from cairn.combine.moe_lora import build_lora_moe, save_lora_moe
    from cairn.combine.router_training import RouterLabelLoss, freeze_all_but_routers
    from cairn.config import TrainingConfig
    from cairn.ledger.contribute import _live_probes, _scores, fold_and_gate, json_rows, parent_old_knowledge, record
    from cairn.ledger.probes import score_items
    from cairn.methods.registry import freeze
    from cairn.models import load_tokenizer
    from cairn.routed_lora import MIXTURE_ATTR
    from cairn.train.loop import train

    t0 = time.perf_counter()
    if project.contribution_exists(name) or name in {r.name for r in project.releases()}:
        raise CairnError(f"a contribution or release named {name!r} already exists in {project.path}; pick another --name")
    if len(sources) < 2:
        raise CairnError(f"mixing needs at least two releases (adapters, or a mixture and an adapter), got {len(sources)}")
    if steps < 1 or not lr > 0:
        raise CairnError(f"router training needs --router-steps >= 1 and --router-lr > 0 (got {steps}, {lr})")
    host, parent, experts = _experts(project, [project.release(s) for s in sources])
    if top_k is not None and not 1 <= top_k <= len(experts):
        raise CairnError(f"--top-k {top_k}: choose 1..{len(experts)} experts per token (or leave it out: dense)")
    tokenizer = load_tokenizer(project.base)
    live = _live_probes(project)
    probes = {p.name: p for p in project.probes()}
    rows_of = {n: json_rows(project.store.get_bytes(p.sha)) for n, p in probes.items()}
    # the experts' probe sets that are not live (a rejected contribution's) are scored but not gated
    new = list(dict.fromkeys(n for e in experts for n in e["probes"] if n not in {p.name for p in live}))

    parent_model = build_release(project, parent)
    parent_scores = _scores(project, parent.id, parent_model, tokenizer, live, rows_of)
    for n in new:
        parent_scores[n] = score_items(parent_model, tokenizer, rows_of[n], probes[n].metric)
    parent_ok = parent_old_knowledge(project, parent, parent_model, tokenizer)
    # the parent is scored: when it is the host its model becomes the mixture's (built in place)
    host_model = parent_model if parent.id == host.id else build_release(project, host)
    del parent_model
    tcfg = TrainingConfig(max_steps=steps, lr=lr, batch_size=8, warmup_ratio=0.0, scheduler="constant",
                          log_every=max(1, steps // 5), max_grad_norm=1.0)
    per_expert = [[r for n in e["probes"] for r in rows_of[n]] for e in experts]
    with tempfile.TemporaryDirectory(prefix="cairn-mix-") as tmp:
        tmp = Path(tmp)
        fetched: dict[str, Path] = {}  # a mixture's artifact holds all its experts: read it once
        for i, e in enumerate(experts):
            if e["sha"] not in fetched:
                fetched[e["sha"]] = project.store.get_dir(e["sha"], tmp / f"in-{i}")
        folders = [fetched[e["sha"]] / e["dir"] if e["dir"] else fetched[e["sha"]] for e in experts]
        model = build_lora_moe(host_model, folders, top_k=top_k, router_init="prompts", tokenizer=tokenizer,
                               router_prompts=[[r["prompt"] for r in rows] for rows in per_expert],
                               check_base_name=False)  # each adapter was checked against the host on contribution
        for record_, e in zip(getattr(model, MIXTURE_ATTR)["experts"], experts):
            record_["source"] = f"release {e['release']}"  # not the temporary folder it was read from
        examples, labels = _router_labels(tokenizer, per_expert, tcfg.max_length)
        freeze_all_but_routers(model)
        log(f"training the routers of {name} ({len(experts)} experts) on {len(examples)} probe rows, {steps} steps")
        loss = RouterLabelLoss(labels)
        result = train(model, tokenizer, examples, tcfg, seed=0, loss_parts=[loss], log=log, progress=progress)
        freeze(model).eval()
        save_lora_moe(model, tmp / "mix")
        artifact_sha = project.store.put_dir(tmp / "mix")
    settings = {"fold": "mix", "host": host.name, "sources": sources,
                "experts": [{"release": e["release"], "probes": e["probes"]} for e in experts],
                "top_k": top_k, "normalisation": "softmax",
                "router": {"init": "prompts (mean input of each expert's probe prompts)", "steps": result.steps,
                           "lr": lr, "examples": len(examples), "seconds": result.seconds,
                           "last": result.log[-1] if result.log else None},
                "weights_sha256": fingerprint_model(model)}
    gate, release_scores = fold_and_gate(project, parent, model, tokenizer, [(n, probes[n].metric, rows_of[n]) for n in new],
                                         parent_scores, live, rows_of, parent_ok, settings)
    release = {"name": name, "parent_id": parent.id, "kind": "mix", "artifact_sha": artifact_sha,
               "artifact_kind": MIX_KIND, "status": gate["status"], "gate": gate, "settings": settings}
    rid = record(project, release=release, contributions=[], probe=None, parent_scores=parent_scores,
                 release_scores=release_scores)
    return {"release": name, "release_id": rid, "status": gate["status"], "gate": gate, "artifact_sha": artifact_sha,
            "experts": [e["release"] for e in experts], "wall_seconds": time.perf_counter() - t0}
