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
``experiment.json`` and the other methods still run.

Directory layout: see the README section "Run directory".
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from cairn import atomic
from cairn.config import ExperimentConfig, MethodConfig, to_yaml
from cairn.data.tasks import Task, load_task
from cairn.errors import DISK_ERRNOS, CairnError, disk_error_message
from cairn.eval.continual import summarize
from cairn.eval.task_eval import evaluate_tasks
from cairn.methods import trainable
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


@dataclass
class RoundRecord:
    label: str
    scores: list[float]
    train: dict = field(default_factory=dict)
    eval_seconds: float = 0.0
    old_knowledge: dict | None = None  # task -> {"primary", "primary_stderr", "primary_metric", ...}


def _round_dir(method_dir: Path, k: int, label: str) -> Path:
    return method_dir / "rounds" / f"{k:02d}-{label}"


def _read_round(path: Path) -> RoundRecord | None:
    f = path / "round.json"
    if not f.is_file():
        return None
    return RoundRecord(**json.loads(f.read_text()))


def _write_round(path: Path, record: RoundRecord, predictions: dict) -> None:
    atomic.write_json(path / "predictions.json", predictions)
    atomic.write_json(path / "round.json", dataclasses.asdict(record))  # written last: marks the round done


class Runner:
    """Runs every method of an experiment config into ``out_dir``."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, progress: bool = True, echo: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.echo = echo
        self.tasks: list[Task] = [load_task(t, cfg.data_dir, cfg.seed) for t in cfg.tasks]
        self._tokenizer = None
        self.tokenizer  # a bad model spec fails here, before anything is written

    # -- shared pieces -----------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from cairn.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def load_base(self):
        from cairn.models import load_model

        model = load_model(self.cfg.model, self.cfg.dtype)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def evaluate(self, model) -> tuple[list[float], dict, float]:
        t0 = time.perf_counter()
        scores, preds = evaluate_tasks(model, self.tokenizer, self.tasks, self.cfg.evaluation.batch_size, self.progress)
        return scores, preds, time.perf_counter() - t0

    def old_knowledge(self, model, last: bool) -> dict | None:
        """The old-knowledge suite's scores, when configured for this row (the base counts as 'last')."""
        ok = self.cfg.evaluation.old_knowledge
        if ok is None or ok.when == "none" or (ok.when == "last" and not last):
            return None
        from cairn.eval.suites import evaluate_suite

        data_dir = Path(ok.data_dir).expanduser() if ok.data_dir else None
        scores = evaluate_suite(model, self.tokenizer, ok.tasks, data_dir=data_dir, limit=ok.limit, seed=ok.seed,
                                batch_size=ok.batch_size, num_fewshot=ok.num_fewshot, progress=self.progress,
                                precision=ok.precision)
        keep = ("primary", "primary_stderr", "primary_metric", "n")
        return {task: {k: v for k, v in res.items() if k in keep} for task, res in scores.items()}

    def base_record(self, log: RunLog) -> RoundRecord:
        """The base model's scores, computed once per experiment and shared by every method."""
        path = self.out / "base"
        record = _read_round(path)
        if record is None:
            log(f"evaluating the base model {self.cfg.model} on {len(self.tasks)} tasks")
            base = self.load_base()
            scores, preds, secs = self.evaluate(base)
            record = RoundRecord(label="base", scores=scores, eval_seconds=secs,
                                 old_knowledge=self.old_knowledge(base, last=True))
            _write_round(path, record, preds)
        return record

    # -- experiment --------------------------------------------------------------------------
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.out / "config.yaml", to_yaml(self.cfg))
        log = RunLog(self.out / "log.txt", self.echo)
        status: dict[str, str] = {}
        results: dict[str, dict] = {}
        base = self.base_record(log)
        steps = [(m.name, m, self.run_method) for m in self.cfg.methods]
        steps += [(c.name, c, self.run_combiner) for c in self.cfg.combine]
        for name, step, run_step in steps:
            slog = RunLog(self.out / name / "log.txt", self.echo)
            source = getattr(step, "source", None)
            if source is not None and status.get(source) != "ok":
                status[name] = f"failed: its source method {source!r} did not finish"
                continue
            try:
                results[name] = run_step(step, base, slog)
                status[name] = "ok"
            except CairnError as exc:
                status[name] = f"failed: {exc}"
                slog(f"{name} failed: {exc}")
            except OSError as exc:  # robust guard: a full or read-only disk stops the run (the next step fails too)
                if exc.errno not in DISK_ERRNOS:
                    status[name] = f"failed: {type(exc).__name__}: {exc}"
                    slog(f"{name} crashed:\n{traceback.format_exc()}")
                    continue
                slog(f"{name} stopped: {exc}")
                raise CairnError(disk_error_message(exc, name)) from None
            except Exception as exc:  # keep the other steps' results; the traceback goes to the log
                status[name] = f"failed: {type(exc).__name__}: {exc}"
                slog(f"{name} crashed:\n{traceback.format_exc()}")
        names = [m.name for m in self.cfg.methods] + [c.name for c in self.cfg.combine]
        atomic.write_json(self.out / "experiment.json", {"name": self.cfg.name, "methods": names, "status": status})
        return {"status": status, "results": results}

    def run_method(self, method: MethodConfig, base: RoundRecord, log: RunLog) -> dict:
        mdir = self.out / method.name
        final = mdir / "results.json"
        if final.is_file():
            log(f"{method.name}: already complete, reading {final}")
            return json.loads(final.read_text())
        atomic.write_text(mdir / "config.yaml", to_yaml(dataclasses.replace(self.cfg, methods=[method])))
        tcfg = self.cfg.training_for(method)
        rounds = [base]
        plan = self.plan(method)

        model = None
        restored_upto = 0
        for k, (label, task_ids) in enumerate(plan, start=1):
            rdir = _round_dir(mdir, k, label)
            done = _read_round(rdir)
            if done is not None:
                rounds.append(done)
                continue
            if method.strategy == "one-round":
                model = self.load_base()  # every task from the base, independently
            elif model is None or restored_upto != k - 1:
                model = self.restore(method, mdir, plan, k - 1, log)
                restored_upto = k - 1
            log(f"{method.name}: round {k}/{len(plan)} ({label})")
            model, record, preds = self.train_round(method, tcfg, model, k, label, task_ids, rdir, log)
            _write_round(rdir, record, preds)
            rounds.append(record)
            restored_upto = k
            log(f"{method.name}: after {label}: " + ", ".join(
                f"{t.name}={s:.3f}" for t, s in zip(self.tasks, record.scores)))
        return self.finish(method, mdir, rounds)

    # -- one round ---------------------------------------------------------------------------
    def plan(self, method: MethodConfig) -> list[tuple[str, list[int]]]:
        """The method's rounds as (label, indices of the tasks trained in that round)."""
        if method.strategy == "joint":
            return [("joint", list(range(len(self.tasks))))]
        prefix = "only-" if method.strategy == "one-round" else ""
        return [(f"{prefix}{t.name}", [i]) for i, t in enumerate(self.tasks)]

    def rounds_of(self, method: MethodConfig) -> int:
        return len(self.plan(method))

    def round_examples(self, method: MethodConfig, k: int, task_ids: list[int]) -> tuple[list[dict], dict]:
        if len(task_ids) > 1:  # joint training
            from cairn.data.mixing import joint_mix

            data = joint_mix([self.tasks[i].train for i in task_ids], upsample=method.joint_upsample,
                             seed=self.cfg.seed)
            return data, {"joint": True, "upsample": method.joint_upsample}
        current = self.tasks[task_ids[0]].train
        if method.replay > 0 and task_ids[0] > 0:
            from cairn.data.mixing import replay_mix

            earlier = [self.tasks[i].train for i in range(task_ids[0])]
            data, record = replay_mix(current, earlier, method.replay, seed=self.cfg.seed + k)
            return data, {"replay": record}
        return current, {}

    def train_round(self, method, tcfg, model, k, label, task_ids, rdir: Path, log: RunLog):
        if method.trainable == "lora":
            model = trainable.add_lora_adapter(model, method.lora, k, self.cfg.seed)
        elif method.trainable == "loramoe":
            from cairn.combine.moe_lora import lora_moe_layers
            from cairn.methods.loramoe import apply_loramoe

            if not lora_moe_layers(model):  # the experts are added once and keep learning every round
                m = method.loramoe
                model = apply_loramoe(model, num_experts=m.experts, rank=m.rank, alpha=m.alpha, dropout=m.dropout,
                                      top_k=m.top_k, seed=self.cfg.seed)
            for p in model.parameters():
                p.requires_grad_(False)
            for layer in lora_moe_layers(model).values():  # experts and routers train, the backbone never
                for p in (layer.lora_A, layer.lora_B, layer.router.weight):
                    p.requires_grad_(True)
        else:
            model = trainable.make_full_trainable(model)
        examples, data_record = self.round_examples(method, k, task_ids)
        if data_record:
            atomic.write_json(rdir / "round_data.json", data_record)
        loss_parts = self.loss_parts(method, model, k, rdir)
        result = train(model, self.tokenizer, examples, tcfg, seed=self.cfg.seed + k,
                       checkpoint_dir=self.out / method.name / "checkpoints" / rdir.name,
                       loss_parts=loss_parts, log=log, progress=self.progress)
        log(f"trained {result.steps} steps on {len(examples)} examples in {result.seconds:.1f}s "
            f"({result.tokens_per_second:.0f} tokens/s)")
        model = self.save_artifact(method, model, k, rdir)
        scores, preds, secs = self.evaluate(model)
        last = k == self.rounds_of(method)
        record = RoundRecord(label=label, scores=scores, eval_seconds=secs,
                             old_knowledge=self.old_knowledge(model, last), train={
            "steps": result.steps, "examples": len(examples), "tokens": result.tokens,
            "seconds": result.seconds, "tokens_per_second": result.tokens_per_second, "log": result.log})
        return model, record, preds

    def loss_parts(self, method: MethodConfig, model, k: int, rdir: Path) -> list:
        """The method's extra loss terms for round ``k`` (O-LoRA, N-LoRA)."""
        parts = []
        name = trainable.adapter_name(k)
        if method.olora is not None:
            from cairn.methods.lambdas import lambda_for_round
            from cairn.methods.olora import OLoRALoss, collect_lora_A, load_A_store

            if method.lora.sequential == "stack":
                prev = {i: collect_lora_A(model, trainable.adapter_name(i)) for i in range(1, k)}
            else:  # merged rounds leave only their A's, saved next to each round's adapter
                prev = {}
                for i in range(1, k):
                    store = rdir.parent.glob(f"{i:02d}-*/olora_A.safetensors")
                    for path in store:
                        prev.update(load_A_store(path))
            parts.append(OLoRALoss(prev, lambda_for_round(method.olora.lambda1, k - 1, "O-LoRA lambda1"),
                                   method.olora.lambda2, adapter_name=name))
        if method.trainable == "loramoe":
            from cairn.methods.loramoe import LoRAMoELoss

            parts.append(LoRAMoELoss(beta=method.loramoe.beta, delta=method.loramoe.delta))
        if method.nlora is not None:
            from cairn.methods.lambdas import lambda_for_round
            from cairn.methods.nlora import NLoRALoss

            parts.append(NLoRALoss(lambda_for_round(method.nlora.lam, k - 1, "N-LoRA lambda"), adapter_name=name))
        return parts

    def save_artifact(self, method: MethodConfig, model, k: int, rdir: Path):
        """Write the round's artifact; returns the model the next round starts from."""
        if method.trainable == "lora":
            with atomic.atomic_dir(rdir / "adapter", overwrite=True) as tmp:
                trainable.save_adapter(model, k, tmp)
            if method.olora is not None:
                from cairn.methods.olora import collect_lora_A, save_A_store

                save_A_store(rdir / "olora_A.safetensors", {k: collect_lora_A(model, trainable.adapter_name(k))})
            if method.lora.sequential == "merge":
                return trainable.merge_adapters(model)
            for p in model.parameters():
                p.requires_grad_(False)
            return model
        if method.trainable == "loramoe":
            from cairn.combine.moe_lora import save_lora_moe

            save_lora_moe(model, rdir / "loramoe", overwrite=True)
            for p in model.parameters():
                p.requires_grad_(False)
            return model
        with atomic.atomic_dir(rdir / "model", overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def restore(self, method: MethodConfig, mdir: Path, plan, upto: int, log: RunLog):
        """The model as it was after round ``upto`` (0 = base), rebuilt from saved artifacts."""
        if upto == 0:
            return self.load_base()
        log(f"{method.name}: restoring the model after round {upto} from its artifacts")
        if method.trainable == "loramoe":
            from cairn.combine.moe_lora import load_lora_moe

            model = load_lora_moe(_round_dir(mdir, upto, plan[upto - 1][0]) / "loramoe", self.load_base())
            for p in model.parameters():
                p.requires_grad_(False)
            return model
        if method.trainable == "full":
            from transformers import AutoModelForCausalLM
            import torch

            path = _round_dir(mdir, upto, plan[upto - 1][0]) / "model"
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.cfg.dtype))
            for p in model.parameters():
                p.requires_grad_(False)
            return model
        from peft import PeftModel

        model = self.load_base()
        for k in range(1, upto + 1):
            adir = _round_dir(mdir, k, plan[k - 1][0]) / "adapter" / trainable.adapter_name(k)
            if not adir.is_dir():
                raise CairnError(f"round {k}'s adapter {adir} is missing; delete {mdir} to rerun the method")
            try:
                if isinstance(model, PeftModel):
                    model.load_adapter(str(adir), adapter_name=trainable.adapter_name(k))
                    model.base_model.set_adapter(list(model.peft_config))
                else:
                    model = PeftModel.from_pretrained(model, str(adir), adapter_name=trainable.adapter_name(k))
            except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches: another base model
                raise CairnError(f"round {k}'s adapter {adir} does not fit the base model {self.cfg.model!r} "
                                 f"(was it made for another base?): {str(exc).splitlines()[0]}") from None
            if method.lora.sequential == "merge":
                model = trainable.merge_adapters(model)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    # -- combiners ---------------------------------------------------------------------------
    def ingredients(self, method: MethodConfig) -> list[Path]:
        """The one-round artifacts of ``method``, in task order (models or PEFT adapter folders)."""
        mdir = self.out / method.name
        paths = []
        for k, (label, _) in enumerate(self.plan(method), start=1):
            rdir = _round_dir(mdir, k, label)
            path = rdir / "adapter" / trainable.adapter_name(k) if method.trainable == "lora" else rdir / "model"
            if not path.is_dir():
                raise CairnError(f"ingredient {path} is missing; rerun method {method.name!r}")
            paths.append(path)
        return paths

    def run_combiner(self, comb, base: RoundRecord, log: RunLog) -> dict:
        cdir = self.out / comb.name
        final = cdir / "results.json"
        if final.is_file():
            return json.loads(final.read_text())
        source = next(m for m in self.cfg.methods if m.name == comb.source)
        paths = self.ingredients(source)
        rdir = _round_dir(cdir, 1, comb.name)
        record = _read_round(rdir)
        if record is None:
            log(f"{comb.name}: {comb.kind} of {len(paths)} {source.trainable} ingredients from {source.name}")
            t0 = time.perf_counter()
            model, stats = self.build_combined(comb, source, paths, rdir, log)
            build_s = time.perf_counter() - t0
            scores, preds, secs = self.evaluate(model)
            record = RoundRecord(label=comb.name, scores=scores, eval_seconds=secs,
                                 old_knowledge=self.old_knowledge(model, last=True),
                                 train={"build_seconds": build_s, "stats": stats})
            _write_round(rdir, record, preds)
            log(f"{comb.name}: " + ", ".join(f"{t.name}={s:.3f}" for t, s in zip(self.tasks, record.scores)))
        method_like = MethodConfig(name=comb.name, diagnostics=False)
        results = self.finish(method_like, cdir, [base, record])
        results["method"] = f"{comb.kind}:{comb.method if comb.kind == 'merge' else 'moe'}"
        atomic.write_json(final, results)
        return results

    def build_combined(self, comb, source: MethodConfig, paths: list[Path], rdir: Path, log: RunLog):
        """Write the combined artifact under ``rdir`` and return (model to evaluate, statistics)."""
        import torch
        from transformers import AutoModelForCausalLM

        from cairn.models import resolve_model_path

        base_path = resolve_model_path(self.cfg.model)
        dtype = getattr(torch, self.cfg.dtype)
        if comb.kind == "merge":
            art = rdir / "merged"
            if source.trainable == "full":
                from cairn.combine.merge_models import merge_models

                stats = merge_models(base_path, paths, art, comb.method, overwrite=True, progress=self.progress,
                                     **comb.params)
                return AutoModelForCausalLM.from_pretrained(art, dtype=dtype).eval(), stats
            from cairn.combine.merge_lora import merge_adapters

            stats = merge_adapters(paths, art, comb.method, mode=comb.lora_mode, rank=comb.rank, base=base_path,
                                   overwrite=True, progress=self.progress, **comb.params)
            if comb.lora_mode == "full":
                return AutoModelForCausalLM.from_pretrained(art, dtype=dtype).eval(), stats
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.load_base(), str(art))
            return trainable.merge_adapters(model).eval(), stats
        return self.build_moe(comb, source, paths, rdir, log)

    def router_examples(self, comb, split: str = "eval") -> list[list[dict]]:
        """A small router set per expert: seeded examples of each task's ``eval`` split (else train).

        The seed paper's point is that routers need not see the experts' training data; the demo
        tasks' eval split uses a phrasing that no expert was trained on.
        """
        import random

        per_task = []
        for i, task in enumerate(self.tasks):
            rows = task.splits.get(split) or task.train
            rng = random.Random(f"{self.cfg.seed}-router-{i}")
            per_task.append(rng.sample(rows, min(comb.router_examples, len(rows))))
        return per_task

    def build_moe(self, comb, source: MethodConfig, paths: list[Path], rdir: Path, log: RunLog):
        """MoE mixing (moetify, Lee et al. 2024, arXiv 2408.17280), routers optionally trained."""
        import torch
        from transformers import AutoModelForCausalLM

        from cairn.combine.router_training import (LoRAMoEAuxLoss, MixtralAuxLoss, freeze_all_but_routers,
                                                   require_router_data)
        from cairn.models import resolve_model_path

        params = dict(comb.params)
        aux_coef = float(params.pop("aux_loss_coef", 0.01))
        router_sets = self.router_examples(comb)
        prompts = [[ex["prompt"] for ex in rows] for rows in router_sets]
        if source.trainable == "full":
            from cairn.combine.moe_fft import build_fft_moe

            art = rdir / "moe"
            stats = build_fft_moe(resolve_model_path(self.cfg.model), paths, art, router_prompts=prompts,
                                  overwrite=True, tokenizer=self.tokenizer, seed=self.cfg.seed, **params)
            model = AutoModelForCausalLM.from_pretrained(art, dtype=getattr(torch, self.cfg.dtype))
            parts = [MixtralAuxLoss(aux_coef)]
            MixtralAuxLoss.prepare(model)
        else:
            from cairn.combine.moe_lora import build_lora_moe, mixture_info, save_lora_moe

            model = build_lora_moe(self.load_base(), paths, tokenizer=self.tokenizer, router_prompts=prompts,
                                   seed=self.cfg.seed, **params)
            stats = mixture_info(model)
            parts = [LoRAMoEAuxLoss(aux_coef)]
        if comb.router_training is not None:
            examples = [ex for rows in router_sets for ex in rows]
            require_router_data(examples)
            freeze_all_but_routers(model)
            tcfg = self.cfg.training_for(MethodConfig(name=comb.name, training=comb.router_training))
            result = train(model, self.tokenizer, examples, tcfg, seed=self.cfg.seed,
                           checkpoint_dir=self.out / comb.name / "checkpoints" / "routers", loss_parts=parts,
                           log=log, progress=self.progress)
            stats = dict(stats) | {"router_training": {"steps": result.steps, "examples": len(examples),
                                                       "seconds": result.seconds, "log": result.log}}
        for p in model.parameters():
            p.requires_grad_(False)
        if source.trainable == "full":
            # Router logits are only needed for the aux loss; with a KV cache they break generation.
            model.config.output_router_logits = False
            if comb.router_training is not None:
                with atomic.atomic_dir(rdir / "moe", overwrite=True) as tmp:
                    model.save_pretrained(tmp, safe_serialization=True)
                    self.tokenizer.save_pretrained(tmp)
        else:
            save_lora_moe(model, rdir / "lora-moe", overwrite=True)
        return model.eval(), stats

    # -- results -----------------------------------------------------------------------------
    def diagnostics(self, method: MethodConfig, mdir: Path, rounds: list[RoundRecord]) -> dict:
        """Pairwise collision / orthogonality and per-round sparsity of the rounds' updates."""
        from cairn.eval.diagnostics import round_diagnostics
        from cairn.eval.round_updates import adapter_updates, checkpoint_updates
        from cairn.models import resolve_model_path

        labels = [r.label for r in rounds[1:]]
        dirs = [_round_dir(mdir, k, label) for k, label in enumerate(labels, start=1)]
        if method.trainable == "lora":
            pairs = [adapter_updates(d / "adapter" / trainable.adapter_name(k)) for k, d in enumerate(dirs, start=1)]
            updates, a_factors = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            updates = checkpoint_updates([Path(resolve_model_path(self.cfg.model))] + [d / "model" for d in dirs])
            a_factors = None
        # Nuclear norms need an SVD of every module of every round: for LoRA the r×r core gives them
        # cheaply; for full fine-tuning only small models afford it.
        small = sum(t.numel() for t in updates[0].values()) <= 50_000_000
        diag = round_diagnostics(updates, threshold=method.diagnostics_threshold, a_factors=a_factors,
                                 labels=labels, nuclear=small)
        if method.trainable == "lora" and not small:
            from cairn.eval.round_updates import adapter_nuclear_norm

            for k, (entry, d) in enumerate(zip(diag["updates"], dirs), start=1):
                entry["nuclear_norm"] = adapter_nuclear_norm(d / "adapter" / trainable.adapter_name(k))
        return diag

    def finish(self, method: MethodConfig, mdir: Path, rounds: list[RoundRecord]) -> dict:
        matrix = [r.scores for r in rounds]
        names = [t.name for t in self.tasks]
        train_s = sum(r.train.get("seconds", 0.0) for r in rounds)
        tokens = sum(r.train.get("tokens", 0) for r in rounds)
        results = {
            "name": method.name,
            "method": method.name,
            "model": self.cfg.model,
            "tasks": [{"name": t.name, "metric": t.metric} for t in self.tasks],
            "rows": [r.label for r in rounds],
            "matrix": matrix,
            "figures": summarize(matrix, names, [r.label for r in rounds]),
            "timing": {"train_seconds": train_s, "eval_seconds": sum(r.eval_seconds for r in rounds[1:]),
                       "train_tokens": tokens, "train_tokens_per_second": tokens / train_s if train_s else None},
        }
        ok = old_knowledge_block(rounds)
        if ok is not None:
            results["old_knowledge"] = ok
        if method.diagnostics and len(rounds) > 2:
            results["diagnostics"] = self.diagnostics(method, mdir, rounds)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["after"] + names)
        for r in rounds:
            writer.writerow([r.label] + [f"{s:.6f}" for s in r.scores])
        atomic.write_text(mdir / "results.csv", buf.getvalue())
        atomic.write_text(mdir / "table.md", results_table(results))
        atomic.write_json(mdir / "results.json", results)  # last: marks the method complete
        return results


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


def run_experiment(cfg: ExperimentConfig, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Run every method and return {"status", "results", "out"} without printing tables."""
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name
    return Runner(cfg, out, progress=progress).run() | {"out": out}


def execute(cfg: ExperimentConfig, out_dir: Path | None = None, progress: bool = True) -> int:
    """Run, build the report, print every method's table; exit status 1 if any method failed."""
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / cfg.name
    t0 = time.perf_counter()
    outcome = Runner(cfg, out, progress=progress).run()
    elapsed = time.perf_counter() - t0
    from cairn.report import build_report

    ok = [name for name, s in outcome["status"].items() if s == "ok"]
    report = build_report([out]) if ok else None
    for name, results in outcome["results"].items():
        print(f"\n## {name}\n")
        print(results_table(results))
    for name, s in outcome["status"].items():
        if s != "ok":
            print(f"\nmethod {name}: {s} (see {out / name / 'log.txt'})")
    print(f"\nexperiment directory: {out}  ({elapsed / 60:.1f} min)")
    if report is not None:
        print(f"report: {report}")
    return 0 if len(ok) == len(outcome["status"]) else 1


def load_method_model(method_dir: Path):
    """(model, tokenizer) after the last finished round of a method's run directory.

    The model is rebuilt from the saved artifacts exactly as a resumed run would (LoRA rounds merged
    in order, stacked adapters loaded, the last FFT checkpoint, or the LoRAMoE mixture).
    """
    from cairn.config import load_config

    method_dir = Path(method_dir)
    cfg = load_config(method_dir / "config.yaml")
    method = cfg.methods[0]
    runner = Runner(cfg, method_dir.parent, progress=False, echo=False)
    if method.strategy == "one-round":
        raise CairnError(f"{method_dir} holds independent one-round models; evaluate one of "
                         f"{method_dir / 'rounds'}/NN-only-<task>/ instead")
    plan = runner.plan(method)
    done = 0
    while done < len(plan) and _read_round(_round_dir(method_dir, done + 1, plan[done][0])) is not None:
        done += 1
    log = RunLog(method_dir / "log.txt", echo=False)
    return runner.restore(method, method_dir, plan, done, log), runner.tokenizer
