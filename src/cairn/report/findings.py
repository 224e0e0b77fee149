"""The findings page: each checkable claim of the papers cairn reproduces, and what this run says.

Claims (sources in brackets):

1. LoRA forgets less old knowledge than FFT, sequentially (Lee & Wynter 2024, arXiv:2410.13699,
   Tables 1/2: -1% vs -7%) and after one round (its Fig. 2). On new knowledge the paper says both
   that sequential LoRA has "better average knowledge acquisition" (§4.3) — the score right after
   each task's own round, LoRA − FFT > 0 — and that the final averages are "comparable" (Fig. 4; one
   round: "similar", Fig. 1). A "comparable" claim is supported when the interval contains 0 and
   contradicted when it excludes it (the run can tell the two apart).
2. Replay retains new knowledge best in the fully-cooperative setting (ibid. §4.4, Fig. 8): the
   replay method's final new-knowledge average beats plain sequential and joint training of the
   same kind (LoRA or FFT).
3. MoE mixing beats merging in the semi-cooperative setting (ibid. §4.3, Fig. 7).
4. O-LoRA trades acquisition for lower interference (ibid. Figs. 5/6): lower score right after each
   task's round, higher (less negative) BWT than sequential LoRA.
5. N-LoRA: fewer parameter collisions and less forgetting than O-LoRA (Yang et al. 2024,
   arXiv:2410.10179).
6. LoRAMoE: more world (old) knowledge kept than plain LoRA at similar acquisition (Dou et al.
   2023, arXiv:2312.09979).

Each claim is a difference ``a - b`` between two methods with a claimed sign. Its interval is a
paired bootstrap over test items when both runs saved per-item predictions (new knowledge; old
knowledge when ``old_knowledge_items.json`` exists), else a normal approximation from the saved
standard errors (old knowledge) plus the spread over seeds, else — with several seeds — from the
seeds alone. Verdict: *supports* when the 95% interval excludes 0 on the claimed side, *contradicts*
when it excludes 0 on the other side, *cannot tell* when it contains 0 or no interval exists, and
*not in this run* when a method the claim needs is missing. Methods are found by their spec
(strategy, trainable, replay, olora/nlora, combiner kind; see :mod:`cairn.report.runs`), or by
their names when a run has no config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cairn.eval import continual as C
from cairn.report.html import Section
from cairn.report.items import cell_items, final_items, old_items
from cairn.report.runs import Run
from cairn.report.stats import Interval, mean_sd, normal_diff, paired_bootstrap
from cairn.report.tables import Table, final_new, final_old, to_markdown

Z95 = 1.959963984540054


# ------------------------------------------------------------------ what a method is


def kind(run: Run) -> dict:
    """Normalised spec: strategy, trainable, replay (bool), olora, nlora, combine ('merge'/'moe'/None)."""
    spec = dict(run.spec)
    name = run.label.lower()
    if not spec:  # runs without a config: guess from the name
        spec["trainable"] = ("loramoe" if "loramoe" in name else "full" if ("fft" in name or "full" in name)
                             else "lora")
        spec["replay"] = 0.1 if "replay" in name else 0.0
        spec["strategy"] = "joint" if "joint" in name else "sequential"
        spec["olora"] = {} if ("o-lora" in name or "olora" in name) else None
        spec["nlora"] = {} if ("n-lora" in name or "nlora" in name) else None
        if "moe" in name and "loramoe" not in name:
            spec["kind"] = "moe"
        elif any(w in name for w in ("merge", "ties", "dare", "linear", "average")):
            spec["kind"] = "merge"
    return {
        "strategy": run.strategy,
        "trainable": spec.get("trainable", "lora"),
        "replay": bool(spec.get("replay") or 0),
        "olora": spec.get("olora") is not None,
        "nlora": spec.get("nlora") is not None,
        "combine": spec.get("kind"),
        "lambda1": (spec.get("olora") or {}).get("lambda1") if isinstance(spec.get("olora"), dict) else None,
    }


def _plain(k: dict) -> bool:
    return not (k["replay"] or k["olora"] or k["nlora"] or k["combine"])


def find(runs: list[Run], **want) -> list[Run]:
    """Runs whose :func:`kind` matches every ``key=value`` given."""
    return [r for r in runs if all(kind(r).get(key) == val for key, val in want.items())]


# ------------------------------------------------------------------ measures


@dataclass
class Measure:
    """A number of one method: value (mean over seeds), its sd over seeds, and what an interval needs."""

    value: float | None
    sd: float | None = None
    n_seeds: int = 1
    items: list[list[float]] | None = None  # per task, per item (mean over seeds)
    se: float | None = None  # standard error of the value from item noise (old knowledge)
    keys: list[str] = field(default_factory=list)  # task names of ``items``, for pairing


def _avg(vals) -> float | None:
    d = [v for v in vals if v is not None]
    return sum(d) / len(d) if d else None


def _per_seed(run: Run, fn) -> tuple[float | None, float | None, int]:
    return mean_sd([fn(x.results) for x in run.replicas])


def new_final(run: Run) -> Measure:
    m, sd, n = _per_seed(run, lambda res: _avg(final_new(res, run.spec)))
    items = final_items(run)
    keys = list(items) if items else []
    return Measure(m, sd, n, [items[k] for k in keys] if items else None, keys=keys)


def old_final(run: Run) -> Measure | None:
    if final_old(run.results, run.spec) is None:
        return None
    m, sd, n = _per_seed(run, lambda res: _avg(final_old(res, run.spec)[2]) if final_old(res, run.spec) else None)
    # per-item old-knowledge scores, when the runner saved them (last evaluated row; one-round: mean of models)
    items, keys = None, []
    res = run.replicas[0].results
    rows = [k for k, row in enumerate((res.get("old_knowledge") or {}).get("matrix") or []) if row]
    if rows:
        ks = [k for k in rows if k > 0] if run.one_round else [rows[-1]]
        per_k = [old_items(run, k) for k in ks]
        if per_k and all(p is not None for p in per_k):
            keys = list(per_k[0])
            items = [[sum(v) / len(v) for v in zip(*[p[t] for p in per_k])] for t in keys]
    se = None
    stderr = (res.get("old_knowledge") or {}).get("stderr")
    if stderr and rows:
        ks = [k for k in rows if k > 0] if run.one_round else [rows[-1]]
        ses = []
        for k in ks:
            row = stderr[k] if k < len(stderr) else None
            if row and all(v is not None for v in row):
                ses.append(math.sqrt(sum(v * v for v in row)) / len(row))
        # same items in every model: averaging models does not shrink item noise (conservative)
        se = sum(ses) / len(ses) if ses else None
    return Measure(m, sd, n, items, se, keys)


def acquisition(run: Run) -> Measure:
    """Mean score right after each task's own round (sequential methods)."""
    m, sd, n = _per_seed(run, lambda res: _avg(C.acquisition(res["matrix"])))
    items, keys = [], []
    for i, t in enumerate(run.task_names):
        per = [cell_items(x, i + 1, i) for x in run.replicas] if i + 1 < len(run.results["matrix"]) else [None]
        if any(p is None for p in per):
            return Measure(m, sd, n)
        items.append([sum(v) / len(v) for v in zip(*per)])
        keys.append(t)
    return Measure(m, sd, n, items, keys=keys)


def bwt_points(run: Run) -> Measure:
    """Lopez-Paz BWT in score units, ``mean_{i+1<K} (R[K][i] - R[i+1][i])``; items are per-item drops."""
    m, sd, n = _per_seed(run, lambda res: C.bwt(res["matrix"]))
    K = len(run.results["matrix"]) - 1
    items, keys = [], []
    for i, t in enumerate(run.task_names):
        if i + 1 >= K:
            continue
        per = []
        for x in run.replicas:
            last, right = cell_items(x, K, i), cell_items(x, i + 1, i)
            if last is None or right is None or len(last) != len(right):
                return Measure(m, sd, n)
            per.append([a - b for a, b in zip(last, right)])
        items.append([sum(v) / len(v) for v in zip(*per)])
        keys.append(t)
    return Measure(m, sd, n, items or None, keys=keys)


def collisions(run: Run) -> Measure | None:
    def rate(res):
        pairs = (res.get("diagnostics") or {}).get("pairs") or []
        return _avg(p.get("collision_rate") for p in pairs)

    m, sd, n = _per_seed(run, rate)
    return None if m is None else Measure(m, sd, n)


def difference(a: Measure, b: Measure) -> Interval | None:
    """Interval of a - b (see the module docstring for which test)."""
    if a.value is None or b.value is None:
        return None
    if a.items and b.items and a.keys == b.keys and all(len(x) == len(y) for x, y in zip(a.items, b.items)):
        return paired_bootstrap(a.items, b.items)
    seed_var = 0.0
    if a.n_seeds > 1 and b.n_seeds > 1 and a.sd is not None and b.sd is not None:
        seed_var = a.sd ** 2 / a.n_seeds + b.sd ** 2 / b.n_seeds
    if a.se is not None and b.se is not None:
        iv = normal_diff(a.value, math.sqrt(a.se ** 2 + seed_var / 2), b.value, math.sqrt(b.se ** 2 + seed_var / 2))
        return iv
    if seed_var > 0:
        d = a.value - b.value
        half = Z95 * math.sqrt(seed_var)
        return Interval(d, d - half, d + half)
    return None


# ------------------------------------------------------------------ claims


@dataclass
class Finding:
    claim: str
    source: str
    measure: str
    numbers: str
    interval: str
    verdict: str


def _fmt(m: Measure | None, scale: float = 100.0) -> str:
    if m is None or m.value is None:
        return "–"
    s = f"{scale * m.value:.1f}"
    if m.sd is not None and m.n_seeds > 1:
        s += f" ± {scale * m.sd:.1f}"
    return s


def _verdict(iv: Interval | None, sign: int) -> str:
    if iv is None:
        return "cannot tell (no interval: single seed without saved items)"
    if iv.excludes_zero():
        return "supports" if (iv.estimate > 0) == (sign > 0) else "contradicts"
    return "cannot tell (interval contains 0)"


def _iv_text(iv: Interval | None, scale: float = 100.0) -> str:
    if iv is None:
        return "–"
    return f"{scale * iv.estimate:+.1f} [{scale * iv.low:+.1f}, {scale * iv.high:+.1f}]"


def _compare(claim, source, what, a: Run, b: Run, ma, mb, sign: int) -> Finding:
    iv = difference(ma, mb) if ma is not None and mb is not None else None
    numbers = f"{a.label}: {_fmt(ma)}; {b.label}: {_fmt(mb)}"
    verdict = "cannot tell (not measured in this run)" if ma is None or mb is None or ma.value is None or mb.value is None \
        else _verdict(iv, sign)
    return Finding(claim, source, what, numbers, _iv_text(iv), verdict)


def _similar(f: Finding, differs: str = "the two differ") -> Finding:
    """Re-read a directional verdict for a "the two are similar" claim."""
    if f.verdict.startswith("cannot tell (interval"):
        f.verdict = "supports (interval contains 0: similar)"
    elif f.verdict in ("supports", "contradicts"):
        f.verdict = f"contradicts ({differs})"
    return f


def _lora_and_fft(runs: list[Run], strategy: str) -> tuple[list[Run], list[Run]]:
    """The plain (no replay, O-/N-LoRA or combiner) LoRA and FFT runs of ``strategy``."""
    return tuple([r for r in find(runs, strategy=strategy, trainable=t) if _plain(kind(r))]
                 for t in ("lora", "full"))


def _lora_vs_fft(runs: list[Run], strategy: str, claim: str, source: str, what: str, score) -> Finding:
    """A LoRA-vs-FFT claim on ``strategy``'s plain runs (LoRA − FFT of ``score``), or 'not in this run'."""
    lo, ff = _lora_and_fft(runs, strategy)
    if not lo or not ff:
        return _missing(claim, source, what, f"{strategy} LoRA and FFT methods")
    return _compare(claim, source, what, lo[0], ff[0], score(lo[0]), score(ff[0]), +1)


def _missing(claim, source, what, need: str) -> Finding:
    return Finding(claim, source, what, f"needs {need}", "–", "not in this run")


def evaluate_findings(runs: list[Run]) -> list[Finding]:
    out: list[Finding] = []
    seed_paper = "Lee & Wynter 2024"
    # 1. LoRA forgets less old knowledge than FFT (sequential: Tables 1/2; one-round: Fig. 2)
    for strategy, where in (("sequential", "Tables 1/2"), ("one-round", "Fig. 2")):
        out.append(_lora_vs_fft(runs, strategy, f"LoRA forgets less old knowledge than FFT ({strategy})",
                                f"{seed_paper}, {where}", "old-knowledge final average x100 (LoRA − FFT > 0)",
                                old_final))
    # 1b. new knowledge, LoRA vs FFT: better acquisition (§4.3), comparable final averages (Figs. 1, 4)
    lo, ff = _lora_and_fft(runs, "sequential")
    src = f"{seed_paper}, §4.3"
    if lo and ff:
        out.append(_compare("LoRA acquires more new knowledge than FFT (sequential)", src,
                            "acquisition average x100 (LoRA − FFT > 0)", lo[0], ff[0], acquisition(lo[0]),
                            acquisition(ff[0]), +1))
    else:
        out.append(_missing("LoRA acquires more new knowledge than FFT (sequential)", src,
                            "acquisition average x100", "sequential LoRA and FFT methods"))
    for strategy, where in (("sequential", "Fig. 4"), ("one-round", "Fig. 1")):
        # _similar leaves a 'not in this run' row as it is
        claim = f"LoRA and FFT end comparable on new knowledge ({strategy})"
        out.append(_similar(_lora_vs_fft(runs, strategy, claim, f"{seed_paper}, {where}",
                                          "new-knowledge final average x100 (LoRA − FFT ≈ 0)", new_final)))
    # 2. replay retains new knowledge best (fully cooperative)
    any_replay = False
    for tr in ("lora", "full"):
        rep = [r for r in runs if kind(r)["replay"] and kind(r)["trainable"] == tr]
        others = [r for r in runs if kind(r)["trainable"] == tr and not kind(r)["replay"] and not kind(r)["combine"]
                  and not kind(r)["olora"] and not kind(r)["nlora"] and kind(r)["strategy"] in ("sequential", "joint")]
        if not rep or not others:
            continue
        any_replay = True
        best_other = max(others, key=lambda r: new_final(r).value if new_final(r).value is not None else -1)
        out.append(_compare(f"Replay retains new knowledge best ({'LoRA' if tr == 'lora' else 'FFT'})",
                            f"{seed_paper}, §4.4 Fig. 8", "new-knowledge final average x100 (replay − best of "
                            "sequential/joint > 0)", rep[0], best_other, new_final(rep[0]), new_final(best_other), +1))
    if not any_replay:
        out.append(_missing("Replay retains new knowledge best (fully cooperative)", f"{seed_paper}, §4.4 Fig. 8",
                            "new-knowledge final average", "a replay method and sequential or joint of the same kind"))
    # 3. MoE mixing beats merging
    moes = [r for r in runs if kind(r)["combine"] == "moe"]
    merges = [r for r in runs if kind(r)["combine"] == "merge"]
    claim, src, what = "MoE mixing beats merging (semi-cooperative)", f"{seed_paper}, §4.3 Fig. 7", \
        "new-knowledge final average x100 (best MoE − best merge > 0)"
    if moes and merges:
        bm = max(moes, key=lambda r: new_final(r).value or -1)
        bg = max(merges, key=lambda r: new_final(r).value or -1)
        out.append(_compare(claim, src, what, bm, bg, new_final(bm), new_final(bg), +1))
    else:
        out.append(_missing(claim, src, what, "a MoE combiner and a merge combiner"))
    # 4. O-LoRA trades acquisition for lower interference
    olora = sorted([r for r in runs if kind(r)["olora"] and kind(r)["strategy"] == "sequential"],
                   key=lambda r: kind(r)["lambda1"] if kind(r)["lambda1"] is not None else 0)
    lora, _ = _lora_and_fft(runs, "sequential")
    src = f"{seed_paper}, §4.3 Figs. 5/6"
    if olora and lora:
        o, lo = olora[0], lora[0]
        out.append(_compare("O-LoRA acquires less than LoRA", src, "acquisition average x100 (O-LoRA − LoRA < 0)",
                            o, lo, acquisition(o), acquisition(lo), -1))
        out.append(_compare("O-LoRA interferes less than LoRA", src, "BWT points x100 (O-LoRA − LoRA > 0)",
                            o, lo, bwt_points(o), bwt_points(lo), +1))
    else:
        out.append(_missing("O-LoRA trades acquisition for lower interference", src, "acquisition and BWT",
                            "sequential O-LoRA and LoRA"))
    # 5. N-LoRA vs O-LoRA
    nlora = [r for r in runs if kind(r)["nlora"] and kind(r)["strategy"] == "sequential"]
    src = "Yang et al. 2024 (N-LoRA)"
    if nlora and olora:
        n, o = nlora[0], olora[0]
        cn, co = collisions(n), collisions(o)
        out.append(_compare("N-LoRA has fewer parameter collisions than O-LoRA", src,
                            "mean pairwise collision rate x100 (N-LoRA − O-LoRA < 0)", n, o, cn, co, -1))
        out.append(_compare("N-LoRA forgets less than O-LoRA", src, "BWT points x100 (N-LoRA − O-LoRA > 0)",
                            n, o, bwt_points(n), bwt_points(o), +1))
    else:
        out.append(_missing("N-LoRA: fewer collisions and less forgetting than O-LoRA", src, "collision rate, BWT",
                            "sequential N-LoRA and O-LoRA"))
    # 6. LoRAMoE vs plain LoRA
    lmoe = [r for r in runs if kind(r)["trainable"] == "loramoe"]
    src = "Dou et al. 2023 (LoRAMoE)"
    if lmoe and lora:
        m, lo = lmoe[0], lora[0]
        out.append(_compare("LoRAMoE keeps more world knowledge than LoRA", src,
                            "old-knowledge final average x100 (LoRAMoE − LoRA > 0)", m, lo, old_final(m), old_final(lo), +1))
        out.append(_similar(_compare("LoRAMoE acquires about as much as LoRA", src,
                                     "acquisition average x100 (LoRAMoE − LoRA ≈ 0)", m, lo, acquisition(m),
                                     acquisition(lo), +1), differs="acquisition differs"))
    else:
        out.append(_missing("LoRAMoE keeps more world knowledge than LoRA at similar acquisition", src,
                            "old-knowledge average, acquisition", "LoRAMoE and sequential LoRA"))
    return out


def findings_table(runs: list[Run]) -> Table:
    rows = [[f.claim, f.source, f.measure, f.numbers, f.interval, f.verdict] for f in evaluate_findings(runs)]
    return Table("findings", "Findings: the papers' claims checked on this run",
                 ["claim", "source", "measured as", "this run", "difference [95% interval]", "verdict"], rows, None,
                 ["Difference = first method − second, x100. Interval: paired bootstrap over test items (2000 "
                  "resamples, stratified by task; with seeds, items averaged over seeds) when both runs saved "
                  "per-item predictions; for old knowledge without saved items, a normal approximation from the "
                  "saved standard errors plus the spread over seeds; else from the seeds alone. supports / "
                  "contradicts = the 95% interval excludes 0 on the claimed / the other side; cannot tell = it "
                  "contains 0 or no interval exists; not in this run = a method the claim needs is missing.",
                  "a ± b in 'this run' = mean ± sd over seeds."])


def findings_section(runs: list[Run]) -> Section:
    return Section("Findings", tables=[findings_table(runs)])


def findings_markdown(section: Section) -> str:
    return "\n".join(to_markdown(t) for t in section.tables)
