"""The one experiment runner: a curriculum, one or more methods, a results matrix per method.

For each method, round t starts from round t-1's model (round 0 is the base), trains on task t's data
(plus replay, if the method asks) with the one training loop, saves the round's artifact atomically,
evaluates every task of the curriculum (tasks not yet trained too, for forward transfer) and writes
the round's scores. Joint training is one round over all tasks. The results matrix R[round][task],
the continual-learning figures, CSV, a Markdown table shaped like the seed paper's Tables 3/4
(Lee & Wynter 2024, arXiv 2410.13699) and the report are written at the end.

Resume: a round whose ``round.json`` exists is done and is restored from its artifact instead of
retrained; a round that was interrupted continues from its last training checkpoint. Rerunning the
same command therefore picks up where it stopped. A method that fails is recorded as failed in
``experiment.json`` and the other methods still run. Each method first checks its stored fingerprint
(:mod:`cairn.fingerprint`): a rerun with different settings refuses unless ``overwrite``.

Seeds: with ``seeds: [0, 1, 2]`` every method and combine step runs once per seed into
``<method>/seed-<s>/`` (training seed, initialisation and data order from the seed; the tasks'
subsamples and test sets stay fixed, so ``base/`` is evaluated once and shared). Each method (and
seed) is one tracker run (:mod:`cairn.tracking`).

Directory layout: see the README section "Run directory".
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cairn import atomic, rundir
from cairn.config import ExperimentConfig, MethodConfig, to_yaml
from cairn.data.tasks import Task, load_task
from cairn.errors import DISK_ERRNOS, CairnError, disk_error_message
from cairn.eval.continual import summarize
from cairn.eval.task_eval import evaluate_tasks_metrics
from cairn.methods.registry import Method, RoundContext, compose, freeze
from cairn.rundir import MethodDir, RoundRecord, read_round, write_round
from cairn.train.loop import train


@dataclass
class RunLog:
    """Appends timestamped lines to a run's log file and echoes them."""

    path: Path
    echo: bool = True

    def __call__(self, line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(stamped + "\n")
        if self.echo:
            print(stamped, flush=True)


class Runner:
    """Runs every method of an experiment config into ``out_dir``."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, progress: bool = True, echo: bool = True,
                 seed: int | None = None, overwrite: bool = False):
        from cairn.combine import steps
        from cairn.data.checks import check_task_inputs

        self.cfg = cfg
        self.run_dir = rundir.RunDir(Path(out_dir))
        self.out = self.run_dir.root
        # The seeds to run: one given seed, the config's ``seeds`` (each into <method>/seed-<s>/), or
        # [None] (the single-seed layout <method>/ with ``cfg.seed``).
        self.seeds: list[int | None] = [seed] if seed is not None else list(cfg.seeds or []) or [None]
        self.seed = self.seeds[0]  # the seed being run (method_dir, context and training read it)
        # Several seeds from the config: statuses and results are {seed: ...}; one given seed: flat.
        self.multi_seed = seed is None and bool(cfg.seeds)
        self.progress = progress
        self.echo = echo
        self.overwrite = overwrite
        self.methods = {m.name: compose(m) for m in cfg.methods}
        for comb in cfg.combine:  # a wrong merge method or source fails before any training
            steps.check(comb, self.methods[comb.source].trainable.ingredient_kind)
        # Tasks load with the experiment's seed whatever seeds run: subsamples and test sets are fixed.
        self.tasks: list[Task] = [load_task(t, cfg.data_dir, cfg.seed) for t in cfg.tasks]
        self._tokenizer = None
        self.tokenizer  # a bad model spec fails here, before anything is written
        # Checks that need the tokenizer (chat templates, over-long examples), before any model loads.
        self.data_warnings = [w for t in self.tasks for w in t.warnings] + check_task_inputs(
            self.tasks, self.tokenizer, [cfg.training_for(m).max_length for m in cfg.methods], model=cfg.model)

    @property
    def scfg(self) -> ExperimentConfig:
        """The config as the current seed sees it (``seed`` replaced): rounds and training read this."""
        return self.cfg if self.seed is None else dataclasses.replace(self.cfg, seed=self.seed)

    # -- shared pieces -----------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from cairn.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def load_base(self):
        from cairn.models import load_model

        return freeze(load_model(self.cfg.model, self.cfg.dtype).eval())

    def method_dir(self, name: str) -> MethodDir:
        return self.run_dir.method(name, self.seed)

    def evaluate(self, model) -> tuple[list[float], dict, float, dict]:
        """(primary score per task, predictions, seconds, {task: {metric: score}}) — primary = first metric."""
        t0 = time.perf_counter()
        per_task, preds = evaluate_tasks_metrics(model, self.tokenizer, self.tasks, self.cfg.evaluation.batch_size,
                                                 self.progress)
        scores = [s[t.metrics[0]] for s, t in zip(per_task, self.tasks)]
        metrics = {t.name: s for t, s in zip(self.tasks, per_task)}
        return scores, preds, time.perf_counter() - t0, metrics

    def old_knowledge(self, model, last: bool) -> dict | None:
        """The old-knowledge suite's scores, when configured for this row (the base counts as 'last')."""
        ok = self.cfg.evaluation.old_knowledge
        if ok is None or ok.when == "none" or (ok.when == "last" and not last):
            return None
        from cairn.eval.suites import evaluate_suite, old_knowledge_dir

        data_dir = old_knowledge_dir(ok.data_dir, self.cfg.data_dir)
        scores = evaluate_suite(model, self.tokenizer, ok.tasks, data_dir=data_dir, limit=ok.limit, seed=ok.seed,
                                batch_size=ok.batch_size, num_fewshot=ok.num_fewshot, progress=self.progress,
                                precision=ok.precision, return_items=True)
        # "items" (per question) goes to the round's old_knowledge_items.json (rundir.write_round)
        keep = ("primary", "primary_stderr", "primary_metric", "n", "items")
        return {task: {k: v for k, v in res.items() if k in keep} for task, res in scores.items()}

    def scored(self, model, label: str, last: bool, train_record: dict) -> tuple[RoundRecord, dict]:
        scores, preds, secs, metrics = self.evaluate(model)
        return RoundRecord(label=label, scores=scores, eval_seconds=secs, train=train_record,
                           old_knowledge=self.old_knowledge(model, last), metrics=metrics), preds

    def base_record(self, log: RunLog) -> RoundRecord:
        """The base model's scores, computed once per experiment and shared by every method and seed."""
        record = read_round(self.run_dir.base)
        if record is None:
            log(f"evaluating the base model {self.cfg.model} on {len(self.tasks)} tasks")
            record, preds = self.scored(self.load_base(), "base", True, {})
            if _is_main():
                write_round(self.run_dir.base, record, preds)
            _barrier()
        return record

    # -- experiment --------------------------------------------------------------------------
    def run(self) -> dict:
        """Every method and combine step, once per seed. Returns {"status", "results"}; with several seeds
        each step's entry is ``{seed: ...}`` (seed as a string key, as in experiment.json).

        The run directory's lock (:mod:`cairn.runlock`, one writer per directory) is held throughout.
        """
        lock = _run_lock(self.out) if _is_main() else None  # one writer: the main process holds the lock
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def log_to(self, path: Path):
        """A run log at ``path`` on the main process; a silent one on the others (one writer per file)."""
        return RunLog(path, self.echo) if _is_main() else _quiet

    def _run(self) -> dict:
        # Only the main process writes run files; the others train and evaluate alongside it (the loop
        # and the evaluators are collective) and wait at a barrier before reading what it wrote.
        if _is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.run_dir.config, to_yaml(self.cfg))
        log = self.log_to(self.run_dir.log)
        log(self.world_line())
        for warning in self.data_warnings:
            log(f"data warning: {warning}")
        seeded = self.multi_seed
        status: dict[str, str | dict] = {}
        results: dict[str, dict] = {}
        crashed = False  # a failure that is not a CairnError (bad input, diverged loss): `cairn run` exits 1, not 2
        base = self.base_record(log)
        steps = [(m.name, m, self.run_method) for m in self.cfg.methods]
        steps += [(c.name, c, self.run_combiner) for c in self.cfg.combine]
        for seed in self.seeds:
            self.seed = seed
            done: dict[str, str] = {}
            for name, step, run_step in steps:
                slog = self.log_to(self.method_dir(name).log)
                source = getattr(step, "source", None)
                if source is not None and done.get(source) != "ok":
                    done[name] = f"failed: its source method {source!r} did not finish"
                else:
                    try:
                        out = run_step(step, base, slog)
                        done[name] = "ok"
                        if seeded:
                            results.setdefault(name, {})[str(seed)] = out
                        else:
                            results[name] = out
                    except CairnError as exc:
                        done[name] = f"failed: {exc}"
                        slog(f"{name} failed: {exc}")
                    except OSError as exc:  # robust guard: a full or read-only disk stops the run
                        if exc.errno not in DISK_ERRNOS:
                            crashed = True
                            done[name] = f"failed: {type(exc).__name__}: {exc}"
                            slog(f"{name} crashed:\n{traceback.format_exc()}")
                        else:
                            slog(f"{name} stopped: {exc}")
                            raise CairnError(disk_error_message(exc, name)) from None
                    except Exception as exc:  # keep the other steps' results; the traceback goes to the log
                        crashed = True
                        done[name] = f"failed: {type(exc).__name__}: {exc}"
                        slog(f"{name} crashed:\n{traceback.format_exc()}")
                if seeded:
                    status.setdefault(name, {})[str(seed)] = done[name]
                else:
                    status[name] = done[name]
        self.seed = self.seeds[0]
        if _is_main():
            self.run_dir.write_status(rundir.ExperimentStatus(
                self.cfg.name, [name for name, _, _ in steps], status,
                seeds=[s for s in self.seeds if s is not None] or None))
        _barrier()
        return {"status": status, "results": results, "crashed": crashed}

    def world_line(self) -> str:
        """World size, device and precision, said at the start of every run (issue 10: a launcher that
        asked for several processes while one runs must be visible)."""
        import os

        import torch

        try:
            from cairn import dist  # the process-world helpers, where present

            world = dist.world_size()
        except ImportError:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
        bf16 = sorted({self.cfg.training_for(m).bf16 for m in self.cfg.methods})
        precision = "/".join("bf16 autocast" if b else "fp32 compute" for b in bf16)
        seeds = f", seeds {', '.join(map(str, self.seeds))}" if self.seeds != [None] else f", seed {self.cfg.seed}"
        return (f"cairn run {self.cfg.name}: world size {world}, device {device}, weights {self.cfg.dtype}, "
                f"{precision}{seeds}")

    # -- plan (the dry run reads these; no weights load) -------------------------------------
    def plan(self, method_cfg: MethodConfig) -> list[tuple[str, list[int]]]:
        return self.methods[method_cfg.name].plan(self.tasks)

    def round_examples(self, method_cfg: MethodConfig, k: int, task_ids: list[int] | None = None):
        """(examples, record) of round ``k`` of a method, as training would see them (current seed)."""
        return self.methods[method_cfg.name].round_examples(self.context(method_cfg, k, lambda line: None))

    def restore_round(self, method_cfg: MethodConfig, k: int):
        """The model after round ``k`` of a method (the current seed's directory), rebuilt from its artifacts."""
        method = self.methods[method_cfg.name]
        return method.restore(self.context(method_cfg, k, lambda line: None), k)

    def context(self, method_cfg: MethodConfig, k: int, log) -> RoundContext:
        method = self.methods[method_cfg.name]
        plan = method.plan(self.tasks)
        mdir = self.method_dir(method_cfg.name)
        label, task_ids = plan[k - 1] if k else ("base", [])
        return RoundContext(cfg=self.scfg, method=method_cfg, k=k, label=label, task_ids=task_ids,
                            rdir=mdir.round(k, label), mdir=mdir, tasks=self.tasks, tokenizer=self.tokenizer,
                            load_base=self.load_base, log=log, plan=plan, write=_is_main())

    def run_method(self, method_cfg: MethodConfig, base: RoundRecord, log: RunLog) -> dict:
        from cairn.fingerprint import check_fingerprint, method_fingerprint
        from cairn.tracking import open_tracking

        mdir = self.method_dir(method_cfg.name)
        # First: a rerun with other settings must not reuse finished rounds (refuses unless overwrite).
        if _is_main():
            check_fingerprint(mdir.path, method_fingerprint(self.cfg, method_cfg, self.seed), self.overwrite)
        _barrier()
        if mdir.results.is_file():
            log(f"{method_cfg.name}: already complete, reading {mdir.results}")
            if _is_main():  # a run killed while pruning after its results left models the policy removes
                plan = self.methods[method_cfg.name].plan(self.tasks)
                self.prune(method_cfg, mdir, plan, len(plan), finished=True, log=log)
            return rundir.read_results(mdir.results)
        # The experiment's seed stays (it fixes the tasks' subsamples); a seed-<s>/ folder names its seed.
        if _is_main():
            atomic.write_text(mdir.config, to_yaml(dataclasses.replace(self.cfg, methods=[method_cfg], combine=[],
                                                                       seeds=None)))
        tr = open_tracking(self.cfg, self.out, method_cfg.name, self.seed)
        try:
            method = self.methods[method_cfg.name]
            plan = method.plan(self.tasks)
            rounds, model, at = [base], None, None  # `at`: the round the model in memory finished
            for k in range(1, len(plan) + 1):
                ctx = self.context(method_cfg, k, log)
                done = read_round(ctx.rdir)
                if done is not None:
                    rounds.append(done)
                    continue
                if method.strategy.from_base or at != k - 1:
                    if k > 1 and not method.strategy.from_base:
                        log(f"{method_cfg.name}: restoring the model after round {k - 1} from its artifacts")
                    model = method.restore(ctx, 0 if method.strategy.from_base else k - 1)
                log(f"{method_cfg.name}: round {k}/{len(plan)} ({ctx.label})")
                offset = sum(r.train.get("steps", 0) for r in rounds[1:])  # one step axis across rounds
                model, record, preds = self.train_round(method, model, ctx, last=k == len(plan),
                                                        log_fn=tr.round_log_fn(k, ctx.label, ctx.rdir, offset))
                if _is_main():
                    write_round(ctx.rdir, record, preds)
                    self.prune(method_cfg, mdir, plan, k, finished=False, log=log)
                _barrier()  # the round's artifact and record exist before any process reads them
                rounds.append(record)
                at = k
                tr.log_round(k, ctx.label, dict(zip((t.name for t in self.tasks), record.scores)),
                             offset + record.train.get("steps", 0), _ok_primary(record.old_knowledge))
                log(f"{method_cfg.name}: after {ctx.label}: " + ", ".join(
                    f"{t.name}={s:.3f}" for t, s in zip(self.tasks, record.scores)))
            diagnostics = self.diagnostics(method, method_cfg, mdir, rounds)
            results = self.finish(method_cfg.name, mdir, rounds, method_cfg.strategy, diagnostics,
                                  extra={"trainable": method_cfg.trainable, "replay": method_cfg.replay})
            if _is_main():
                self.prune(method_cfg, mdir, plan, len(plan), finished=True, log=log)
            tr.log_results(results)
            return results
        finally:
            tr.finish()

    def prune(self, method_cfg: MethodConfig, mdir: MethodDir, plan: list, k: int, finished: bool, log) -> None:
        """storage.keep_models: remove full-fine-tuning round models no later step reads (round.json stays,
        so a rerun does not train them again). Ingredients of a combine step are kept. A kept delta round
        whose parent goes is first re-based onto the nearest kept round or the base
        (:func:`cairn.io.fft_round.prune_models`, crash-safe)."""
        from cairn.io.delta import rounds_to_keep
        from cairn.io.fft_round import prune_models

        policy = self.cfg.storage.keep_models
        if policy == "all" or method_cfg.trainable != "full":
            return
        if policy == "last" and method_cfg.diagnostics and not finished:
            policy = "needed"  # the update diagnostics read every round at the method's end
        dirs = {i: mdir.round(i, plan[i - 1][0]) for i in range(1, k + 1)}
        pending = any(c.source == method_cfg.name for c in self.cfg.combine)
        keep = set(rounds_to_keep(policy, [d.name for d in dirs.values()], trainable="full",
                                  strategy=method_cfg.strategy, method_finished=finished,
                                  combine_sources_pending=pending))
        prefix = f"{method_cfg.name}: "
        for folder in prune_models(dirs, {i for i, d in dirs.items() if d.name in keep}, self.load_base,
                                   log=lambda line: log(prefix + line)):
            log(f"{prefix}removed {folder} (storage.keep_models: {self.cfg.storage.keep_models})")

    def train_round(self, method: Method, model, ctx: RoundContext, last: bool, log_fn=None):
        model = method.prepare(model, ctx)
        examples, data_record = method.round_examples(ctx)
        if data_record and ctx.write:
            atomic.write_json(ctx.rdir / "round_data.json", data_record)
        kwargs = {"log_fn": log_fn} if log_fn is not None and _train_takes("log_fn") else {}
        result = train(model, self.tokenizer, examples, self.cfg.training_for(ctx.method), seed=ctx.seed + ctx.k,
                       checkpoint_dir=ctx.mdir.checkpoints(ctx.rdir.name), loss_parts=method.loss_parts(model, ctx),
                       log=ctx.log, progress=self.progress, **kwargs)
        ctx.log(f"trained {result.steps} steps on {len(examples)} examples in {result.seconds:.1f}s "
                f"({result.tokens_per_second:.0f} tokens/s)")
        model = method.finish_round(model, ctx)
        record, preds = self.scored(model, ctx.label, last, {
            "steps": result.steps, "examples": len(examples), "tokens": result.tokens, "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second, "log": result.log})
        return model, record, preds

    # -- combiners ---------------------------------------------------------------------------
    def run_combiner(self, comb, base: RoundRecord, log: RunLog) -> dict:
        from cairn.combine import steps
        from cairn.models import resolve_model_path

        from cairn.fingerprint import check_fingerprint, method_fingerprint

        cdir = self.method_dir(comb.name)
        source_cfg = next(m for m in self.cfg.methods if m.name == comb.source)
        if _is_main():
            check_fingerprint(cdir.path, {"combine": dataclasses.asdict(comb),
                                          "source": method_fingerprint(self.cfg, source_cfg, self.seed)},
                              self.overwrite)
        _barrier()
        if cdir.results.is_file():
            return rundir.read_results(cdir.results)
        source = self.methods[comb.source]
        kind = source.trainable.ingredient_kind
        src_dir = self.method_dir(comb.source)
        paths = []
        if _is_main():  # delta-stored FFT ingredients are materialised once, by the writing process
            for k, (label, _) in enumerate(source.plan(self.tasks), start=1):
                if src_dir.round(k, label).is_dir():
                    source.trainable.ingredient(src_dir.round(k, label), k)
        _barrier()
        for k, (label, _) in enumerate(source.plan(self.tasks), start=1):
            path = source.trainable.ingredient(src_dir.round(k, label), k)
            if not path.is_dir():
                raise CairnError(f"ingredient {path} is missing; rerun method {comb.source!r}")
            paths.append(path)
        rdir = cdir.round(1, comb.name)
        record = read_round(rdir)
        if record is None:
            log(f"{comb.name}: {comb.kind} of {len(paths)} {kind} ingredients from {comb.source}")
            inputs = steps.CombineInputs(
                base_path=str(resolve_model_path(self.cfg.model)), dtype=self.cfg.dtype, seed=self.scfg.seed,
                tokenizer=self.tokenizer, load_base=self.load_base, train=train,
                training_for=lambda over: self.cfg.training_with(over, f"combine[{comb.name}].router_training"),
                checkpoints=cdir.checkpoints("routers"), progress=self.progress, log=log)
            t0 = time.perf_counter()
            model, stats = steps.build(comb, kind, paths, rdir, self.tasks, inputs, write=_is_main())
            record, preds = self.scored(model, comb.name, True,
                                        {"build_seconds": time.perf_counter() - t0, "stats": stats})
            if _is_main():
                write_round(rdir, record, preds)
            log(f"{comb.name}: " + ", ".join(f"{t.name}={s:.3f}" for t, s in zip(self.tasks, record.scores)))
        if _is_main():  # full copies materialised from delta-stored ingredients (storage.fft_format: delta)
            for path in paths:
                if path.name == "model-full":
                    shutil.rmtree(path, ignore_errors=True)
        label = f"{comb.kind}:{comb.method if comb.kind == 'merge' else 'moe'}"
        return self.finish(comb.name, cdir, [base, record], label=label,
                           extra={"kind": comb.kind, "source": comb.source, "trainable": source_cfg.trainable,
                                  "replay": source_cfg.replay})

    # -- results -----------------------------------------------------------------------------
    def diagnostics(self, method: Method, method_cfg: MethodConfig, mdir: MethodDir, rounds: list[RoundRecord]):
        """Pairwise collision / orthogonality and per-round sparsity of the rounds' updates (None: not asked)."""
        from cairn.eval.diagnostics import round_diagnostics

        if not method_cfg.diagnostics or len(rounds) <= 2:
            return None

        labels = [r.label for r in rounds[1:]]
        dirs = [mdir.round(k, label) for k, label in enumerate(labels, start=1)]
        if method_cfg.trainable == "full" and not all((d / "model").is_dir() for d in dirs):
            return None  # storage.keep_models removed earlier rounds (a rerun after the method finished)
        found = method.trainable.updates(self.context(method_cfg, 1, print), dirs)
        if found is None:
            return None
        updates, a_factors, nuclear_of = found
        # Nuclear norms need an SVD of every module of every round: for LoRA the r×r core gives them
        # cheaply; for full fine-tuning only small models afford it.
        small = sum(t.numel() for t in updates[0].values()) <= 50_000_000
        # Large full fine-tunes also do the Gram products in float32 (overlaps to ~1e-5 relative, several
        # times faster on a CPU; the float64 pass took minutes a method for a 135M model).
        diag = round_diagnostics(updates, threshold=method_cfg.diagnostics_threshold, a_factors=a_factors,
                                 labels=labels, nuclear=small, precision="float64" if small else "float32")
        if nuclear_of is not None and not small:
            for k, (entry, d) in enumerate(zip(diag["updates"], dirs), start=1):
                entry["nuclear_norm"] = nuclear_of(k, d)
        return diag

    def finish(self, name: str, mdir: MethodDir, rounds: list[RoundRecord], strategy: str = "combine",
               diagnostics: dict | None = None, label: str | None = None, extra: dict | None = None) -> dict:
        """Write results.json (last: it marks the step complete), results.csv and table.md."""
        matrix = [r.scores for r in rounds]
        names = [t.name for t in self.tasks]
        train_s = sum(r.train.get("seconds", 0.0) for r in rounds)
        tokens = sum(r.train.get("tokens", 0) for r in rounds)
        results = {
            "name": name,
            "method": label or name,
            "strategy": strategy,
            "seed": self.cfg.seed if self.seed is None else self.seed,
            **(extra or {}),
            "model": self.cfg.model,
            "tasks": [{"name": t.name, "metric": t.metric, "metrics": t.metrics} for t in self.tasks],
            "rows": [r.label for r in rounds],
            "matrix": matrix,
            "figures": summarize(matrix, names, [r.label for r in rounds]),
            "timing": {"train_seconds": train_s, "eval_seconds": sum(r.eval_seconds for r in rounds[1:]),
                       "train_tokens": tokens, "train_tokens_per_second": tokens / train_s if train_s else None},
        }
        if any(r.metrics for r in rounds):  # every metric of every task, per row (null: an older round.json)
            results["metrics"] = [[(r.metrics or {}).get(t.name) for t in self.tasks] for r in rounds]
        ok = old_knowledge_block(rounds)
        if ok is not None:
            results["old_knowledge"] = ok
        if diagnostics is not None:
            results["diagnostics"] = diagnostics
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["after"] + names)
        for r in rounds:
            writer.writerow([r.label] + [f"{s:.6f}" for s in r.scores])
        if _is_main():
            atomic.write_text(mdir.csv, buf.getvalue())
            atomic.write_text(mdir.table, results_table(results))
            rundir.write_results(mdir.results, results)  # last: marks the method complete
        _barrier()
        return rundir.read_results(mdir.results)


def _is_main() -> bool:
    from cairn import dist

    return dist.is_main()


def _barrier() -> None:
    from cairn import dist

    dist.barrier()


def _quiet(line: str) -> None:
    """The log of a process that writes no run files."""


def _run_lock(out: Path):
    """The run directory's OS lock (a second `cairn run` on it refuses), where cairn.runlock exists."""
    try:
        from cairn.runlock import lock_run_dir
    except ImportError:  # the lock module arrives with the robustness work
        return None
    return lock_run_dir(out)


def _train_takes(name: str) -> bool:
    import inspect

    return name in inspect.signature(train).parameters


def _ok_primary(old_knowledge: dict | None) -> dict[str, float] | None:
    return {t: v["primary"] for t, v in old_knowledge.items()} if old_knowledge else None


def old_knowledge_block(rounds: list[RoundRecord]) -> dict | None:
    """results.json's "old_knowledge": one row per round (null where the suite did not run)."""
    scored = [r.old_knowledge for r in rounds if r.old_knowledge]
    if not scored:
        return None
    tasks = list(scored[0])
    return {
        "tasks": tasks,
        "metric": {t: scored[0][t]["primary_metric"] for t in tasks},
        "matrix": [[r.old_knowledge[t]["primary"] if r.old_knowledge else None for t in tasks] for r in rounds],
        "stderr": [[r.old_knowledge[t]["primary_stderr"] if r.old_knowledge else None for t in tasks] for r in rounds],
    }


def results_table(results: dict) -> str:
    from cairn.report.tables import new_knowledge_table_markdown

    return new_knowledge_table_markdown(results)


def run_experiment(cfg: ExperimentConfig, out_dir: Path | None = None, progress: bool = True,
                   echo: bool = True, seed: int | None = None, overwrite: bool = False) -> dict:
    """Run every method and return {"status", "results", "out"} without printing tables.

    ``seed`` given: only that seed, into ``<method>/seed-<seed>/`` (the several-seeds layout); else the
    config's ``seeds`` (each one so), else one run with ``cfg.seed`` into ``<method>/``. ``overwrite``:
    a method whose stored settings differ from ``cfg``'s starts again instead of refusing.
    """
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name
    return Runner(cfg, out, progress=progress, echo=echo, seed=seed, overwrite=overwrite).run() | {"out": out}


def execute(cfg: ExperimentConfig, out_dir: Path | None = None, progress: bool = True, overwrite: bool = False,
            echo: bool = True) -> int:
    """`cairn run`: run, print the summary (round tables, comparison, findings) and the report's path.

    Exit status 0 when every method and combine step finished (for every seed); 2 when each failure
    was a :class:`CairnError` (bad input, or a diverged loss: ``TrainingDiverged``), whose messages go
    to stderr; 1 when any step crashed otherwise (the traceback is in its log).
    """
    from cairn.commands.demo import print_summary

    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name
    t0 = time.perf_counter()
    outcome = run_experiment(cfg, out, progress=progress, echo=echo, overwrite=overwrite)
    elapsed = time.perf_counter() - t0
    flat = {}  # print_summary takes one status string per step: a seeded step's first failure, else "ok"
    for name, st in outcome["status"].items():
        if isinstance(st, dict):
            bad = [f"seed {s}: {v}" for s, v in st.items() if v != "ok"]
            flat[name] = "ok" if not bad else ("failed: " if len(bad) == len(st) else "partly failed: ") + "; ".join(bad)
        else:
            flat[name] = st
    if _is_main():  # one summary per run, not one per process under torchrun
        print_summary(out, flat)
        print(f"\nexperiment directory: {out}  ({elapsed / 60:.1f} min)")
    failed = {name: st for name, st in outcome["status"].items() if not rundir.status_ok(st)}
    if not failed:
        return 0
    if outcome.get("crashed", True):
        return 1
    import sys

    if not _is_main():
        return 2
    for name, st in failed.items():
        for line in ([f"seed {s}: {v}" for s, v in st.items() if v != "ok"] if isinstance(st, dict) else [st]):
            print(f"error: {name}: {line}", file=sys.stderr)
    return 2


def load_method_model(method_dir: Path):
    """(model, tokenizer) after the last finished round of a method's run directory.

    The model is rebuilt from the saved artifacts exactly as a resumed run would (LoRA rounds merged
    in order, stacked adapters loaded, the last FFT checkpoint, or the LoRAMoE mixture).
    """
    from cairn.config import load_config

    mdir = MethodDir(Path(method_dir))
    cfg = load_config(mdir.config)
    method_cfg = cfg.methods[0]
    seeded = mdir.path.name.startswith("seed-")
    root = mdir.path.parent.parent if seeded else mdir.path.parent
    runner = Runner(cfg, root, progress=False, echo=False, seed=int(mdir.path.name[5:]) if seeded else None)
    method = runner.methods[method_cfg.name]
    if method.strategy.from_base:
        raise CairnError(f"{mdir.path} holds independent one-round models; evaluate one of "
                         f"{mdir.path / 'rounds'}/NN-only-<task>/ instead")
    plan = method.plan(runner.tasks)
    done = 0
    while done < len(plan) and read_round(mdir.round(done + 1, plan[done][0])) is not None:
        done += 1
    ctx = runner.context(method_cfg, done, RunLog(mdir.log, echo=False))
    return method.restore(ctx, done), runner.tokenizer
