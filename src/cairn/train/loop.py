"""The one training loop, on Accelerate, shared by every method, in one process or many.

Methods differ only in what they hand this loop: which parameters require grad (full, LoRA,
routers, LoRAMoE experts), the round's examples (current task, + replay, joint), and optional extra
loss parts — objects with ``extra_loss(model, batch, outputs) -> dict[name, tensor]`` whose terms are
added to the task loss and logged separately every logging step (O-LoRA issue #33 shows why: a
penalty can silently dwarf the task loss). Loss parts always get the UNWRAPPED model.

Details that matter for reproducibility, resume and multi-process runs (DDP/FSDP/DeepSpeed through
Accelerate, launched with ``torchrun`` or ``accelerate launch``):
- the GLOBAL batch is ``batch_size x world_size x grad_accum`` examples; steps, epochs and the LR
  schedule are counted in global batches, so they do not depend on how many processes run;
- the micro-batch order is a pure function of (seed, epoch) over the whole data set, computed the
  same on every process; process ``r`` takes slice ``r`` of each global micro-batch, so every
  example is seen once per epoch in total and a resumed run sees the same batches;
- the task loss is cross-entropy SUMMED over answer tokens and divided by the answer-token count of
  the whole global batch (all processes, all accumulation micro-steps). The count needs no
  all-reduce: every process knows the global order, so it counts the tokens itself. DDP averages
  gradients over processes, so each process scales its sum by ``world``: 2 processes x batch b give
  the update of 1 process x batch 2b up to float rounding (tested under torchrun);
- extra loss parts are per micro-batch values; they are divided by ``grad_accum`` (and averaged over
  processes by DDP), so a data-independent penalty (O-LoRA, N-LoRA) has the same weight at any scale;
- the LR scheduler is NOT passed to ``accelerator.prepare``: Accelerate's wrapper steps a scheduler
  ``num_processes`` times per optimizer step (it assumes a schedule written for the per-process
  batch), which would end a linear schedule after 1/world of training. cairn's schedule is written
  for the global batch, so it is stepped once per optimizer step;
- checkpoints store trainable params, optimizer, scheduler and RNG states (main process writes,
  others wait) and the round's counters (tokens seen, the loss log so far, training seconds, the
  loss sums since the last logging step); rerunning after an interruption continues from the last
  checkpoint and, in one process, ends with bit-identical weights and the same record (timings aside);
- loss is on answer tokens only (see :mod:`cairn.data.encode`); the output layer is applied only at
  answer positions (see :func:`answer_token_loss`);
- micro-batches are padding-free where exact (``training.packing``, :mod:`cairn.train.packing`):
  the examples laid end to end, each attending only to itself, so no matmul runs on pads;
- bf16 is autocast (trainable weights stay float32), on CPU and GPU alike, through Accelerate. The
  frozen Linear weights are held in bf16 for the round (speed: autocast would cast them on every
  forward, as it caches casts of trainable weights only) and restored afterwards; the matmuls see
  the same bf16 values either way. ``base_dtype: bfloat16`` keeps them in bf16 for good (memory).
  PEFT's cast of adapter inputs to float32 is skipped then (autocast casts them back: exact);
- on a CPU, glibc keeps freed memory (:mod:`cairn.cpu_allocator`), and without AMX a bf16 round's
  attention runs in float32 (:mod:`cairn.train.packing`): both measured, see the README;
- AdamW is torch's fused kernel (see :func:`make_optimizer`);
- unsharded PEFT LoRA linears run as one autograd node each (:mod:`cairn.train.fused_lora`: the
  adapter scaled on its r columns and accumulated into the output by the matmul);
- in one unsharded process, a trainable input embedding's gradient is added to ``.grad`` in place
  after each backward (:mod:`cairn.train.embedding_grad`) instead of through a vocab-sized dense
  buffer per step;
- a NaN/Inf loss term raises :class:`cairn.errors.TrainingDiverged` naming the step and the term,
  before the optimizer step and before any checkpoint is written.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from cairn import dist
from cairn.config import TrainingConfig
from cairn.cpu_allocator import keep_freed_memory
from cairn.data.encode import IGNORE_INDEX, collate, encode_example
from cairn.errors import CairnError, TrainingDiverged
from cairn.loss_parts import LossPart
from cairn.train import checkpoint as ckpt
from cairn.train.embedding_grad import deferred_embedding_grad
from cairn.train.fused_lora import fused_lora_linears
from cairn.train.packing import (collate_packed, float32_attention_round, packed_attention_enabled,
                                 packed_forward_kwargs, packing_blocker)
from cairn.train.setup import (adapter_input_casts_off, apply_model_settings, frozen_linears_in_bf16, hf_model,
                               output_layer_weight, restore_model_settings)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    log: list[dict] = field(default_factory=list)
    world_size: int = 1
    # the full (unsharded) state dict, on the main process, when FSDP/DeepSpeed sharded the model
    state_dict: dict | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _stock_path(model) -> bool:
    """Models whose loss must come from their own forward (soft-capped logits, router aux loss, an
    output layer that is offloaded behind an Accelerate hook or adds a bias before a logit scale)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings()
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "output_router_logits", False)
                or head is None or hasattr(head, "_hf_hook")
                or (getattr(head, "bias", None) is not None
                    and (getattr(config, "logits_scaling", None) or getattr(config, "logit_scale", None))))


def _pass_through(hidden):
    return hidden


@contextlib.contextmanager
def _output_layer_bypassed(head) -> Iterator[None]:
    """While inside, ``head`` returns its input: the model's forward hands back its final hidden
    states (after any linear logit scale, e.g. Granite's, Cohere's) in place of logits."""
    own = head.__dict__.get("forward")
    head.forward = _pass_through  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def _answer_logits(head, hidden):
    """The output layer on the answer positions.

    A frozen tied head under bf16 autocast multiplies by the round's bf16 copy of its weight
    (:func:`frozen_linears_in_bf16`): autocast's values without casting it each micro-step. A
    trainable float32 head on a CPU runs in float32 outside autocast: the answer positions are few,
    and autocast would cast the vocabulary-sized weight to bf16 forward and its gradient back to
    float32 backward every micro-step (~0.14 s of a ~1.3 s full fine-tuning step of SmolLM2-135M on
    2 CPU cores); from ~300 answer tokens per micro-batch on, bf16 matmuls would win it back.
    Elsewhere (GPUs: casts are cheap), autocast decides as in the model's own forward.
    """
    import torch.nn.functional as F

    weight = output_layer_weight(head)
    if weight is not head.weight:
        return F.linear(hidden.to(weight.dtype), weight, None if head.bias is None else head.bias.to(weight.dtype))
    if (hidden.device.type == "cpu" and torch.is_autocast_enabled("cpu") and weight.requires_grad
            and weight.dtype == torch.float32):
        with torch.autocast("cpu", enabled=False):
            return head(hidden.float())
    return head(hidden)


def answer_token_loss(model, batch: dict, *, raw=None, sharded: bool = False):
    """``(sum of answer-token cross-entropy, number of answer tokens, outputs)`` for one micro-batch.

    The stock ``model(..., labels=...)`` projects every position onto the vocabulary (for SmolLM2,
    49k x 576 per token: about a fifth of the forward) although only the few answer tokens carry
    loss. Here the model runs (through ``model``, the possibly DDP-wrapped module, so its gradient
    hooks are armed) with its output layer bypassed, so it returns the final hidden states; those
    at positions whose next token is a label go through the output layer of ``raw`` (the unwrapped
    model). Neither ``output_hidden_states`` nor a kept last-position logit is asked for: each
    cost a vocabulary-sized matmul (and, under autocast, a cast of the whole output layer) per
    micro-batch. ``outputs.logits`` is None on this path. Models with logit soft-capping or router
    aux losses, and sharded models (FSDP/ZeRO-3, whose output layer is only materialised inside the
    forward), use the stock path with a summed loss.
    """
    import torch.nn.functional as F

    raw = model if raw is None else raw
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if sharded or _stock_path(raw):
        # transformers' loss divides the summed CE by num_items_in_batch when given one
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        num_items_in_batch=max(n, 1))
        total = outputs.loss * max(n, 1)
        return total, n, outputs
    head = raw.get_output_embeddings()
    with _output_layer_bypassed(head):
        if "cu_seq_lens" in batch:  # padding-free row (cairn.train.packing): positions restart per example
            outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                            **packed_forward_kwargs(batch["cu_seq_lens"]))
        else:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = outputs.logits[:, :-1]                      # position t predicts token t+1
    outputs.logits = None
    logits = _answer_logits(head, hidden[keep])
    total = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return total, n, outputs


def answer_only_loss(model, batch: dict):
    """Mean answer-token cross-entropy (equal to the stock ``model(labels=...).loss``) and outputs."""
    total, n, outputs = answer_token_loss(model, batch)
    loss = total / max(n, 1)
    outputs.loss = loss
    return loss, outputs


def _seeded_permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def micro_batch_order(n: int, batch_size: int, total_micro: int, seed: int,
                      lengths: list[int] | None = None, window: int = 64) -> list[list[int]]:
    """Indices of every (global) micro-batch: epochs of seeded permutations, cut into batches.

    With ``lengths``, each epoch's permutation is sorted by length (longest first) within windows
    of ``window`` batches, HF Trainer's ``group_by_length``: similar lengths share a batch, each
    epoch is still a permutation, and the order is still a pure function of (seed, epoch).
    """
    order: list[int] = []
    epoch = 0
    while len(order) < total_micro * batch_size:
        perm = _seeded_permutation(n, seed, epoch)
        if lengths is not None:
            span = window * batch_size
            perm = [i for s in range(0, n, span) for i in sorted(perm[s:s + span], key=lambda i: -lengths[i])]
        order.extend(perm)
        epoch += 1
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(total_micro)]


def total_steps(n_examples: int, cfg: TrainingConfig, world: int = 1) -> int:
    """Optimizer steps of a round: epochs over the data in GLOBAL batches (independent of ``world``
    only through ``batch_size x world``: 2 processes x batch b == 1 process x batch 2b)."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / (cfg.batch_size * world * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


def _accelerator(cfg: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Each round may ask for a different precision; Accelerate keeps a process-wide state.
    AcceleratorState._reset_state(True)
    bf16 = cfg.bf16 or cfg.base_dtype == "bfloat16"
    where = os.environ.get("ACCELERATE_CONFIG_FILE") or "the accelerate launch settings"
    try:
        accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available())
    except (ImportError, ValueError, RuntimeError, NotImplementedError) as e:
        asked = [b for flag, b in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                 if os.environ.get(flag, "false").lower() == "true"]
        what = f" (distributed_type {asked[0]})" if asked else ""
        raise CairnError(f"cannot set up training from {where}{what}: {str(e).splitlines()[0]}; fix the "
                         f"accelerate config (see configs/accelerate/; FSDP and DeepSpeed need GPUs) or launch "
                         f"without it") from None
    # Accelerate silently falls back to plain multi-CPU DDP when FSDP/DeepSpeed is asked for on a
    # machine without GPUs; a user would believe the model was sharded.
    got = accelerator.distributed_type.value
    for flag, backend in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(flag, "false").lower() == "true" and got != backend:
            raise CairnError(f"{where} asks for {backend} (distributed_type) but Accelerate set up {got} on this "
                             f"machine: {backend} needs GPUs (it is not available on CPU); use "
                             f"configs/accelerate/ddp-cpu.yaml here, or run on GPUs")
    return accelerator


def _configure_deepspeed(accelerator, cfg: TrainingConfig) -> None:
    """Tell DeepSpeed the per-process micro-batch, accumulation and clipping (it needs them before
    ``prepare``, and there is no dataloader to read them from). Needs GPUs: not exercised in CI."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0


def make_optimizer(params: list, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' device (CPU, CUDA).

    The fused kernel updates every tensor in one pass; on a 2-core CPU it took a 135M-parameter
    step from ~8 s to ~1.5 s (HF Trainer's default optimizer is the same fused AdamW). It rounds
    differently from the per-tensor loop, so runs are reproducible on the same kernels only.
    """
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return bool(plugin is not None and plugin.zero_stage == 3)
    return False


def train(
    model,
    tokenizer,
    examples: list[dict],
    cfg: TrainingConfig,
    *,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    loss_parts: Iterable[LossPart] = (),
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``examples`` in place; returns throughput and logs.

    ``log_fn(metrics, step)`` receives every loss term, ``lr`` and ``tokens_per_second`` at each
    logging step, on the main process only (for trackers: W&B, TensorBoard, ...).
    """
    from transformers import get_scheduler

    if not examples:
        raise CairnError("no training examples for this round; check the task's train split")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CairnError("the model has no trainable parameters for this round")
    loss_parts = list(loss_parts)
    torch.manual_seed(seed)
    accelerator = _accelerator(cfg)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # cairn.cpu_allocator: no page faults on each step's re-allocations
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    say = log if main else (lambda s: None)
    sharded = _is_sharded(accelerator)
    precision = "bf16 autocast" if accelerator.mixed_precision == "bf16" else "float32"
    mismatch = dist.warn_if_world_mismatch(world) if main else None
    say(f"training on {world} process(es) ({accelerator.distributed_type.value}), device {accelerator.device}, "
        f"{precision}, frozen base {cfg.base_dtype}; global batch {cfg.batch_size} x {world} x {cfg.grad_accum}")
    if mismatch:
        say(f"WARNING: {mismatch}")

    encoded = [encode_example(tokenizer, ex, cfg.max_length) for ex in examples]
    n_targets = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded]
    steps = total_steps(len(encoded), cfg, world)
    global_bs = cfg.batch_size * world
    lengths = [len(e.input_ids) for e in encoded] if cfg.group_by_length else None
    batches = micro_batch_order(len(encoded), global_bs, steps * cfg.grad_accum, seed, lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    if sharded and loss_parts:
        names = ", ".join(type(p).__name__ for p in loss_parts)
        raise CairnError(f"this method's loss parts ({names}) read whole adapter/router weights, which FSDP and "
                         f"DeepSpeed ZeRO-3 shard across processes; train it with DDP "
                         f"(configs/accelerate/ddp.yaml) or ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml)")
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    if deepspeed:
        _configure_deepspeed(accelerator, cfg)
    settings = apply_model_settings(model, cfg)
    raw_model = model
    optimizer = make_optimizer(params, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    # Stepped once per optimizer step by this loop (see the module docstring for why not prepared).
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)

    start, resumed = 0, {}
    if checkpoint_dir is not None and ckpt.has_checkpoint(checkpoint_dir):
        resumed = ckpt.load_checkpoint(checkpoint_dir, raw, optimizer, scheduler)
        start = resumed["step"]
        say(f"resuming from step {start}/{steps} ({checkpoint_dir})")

    result = TrainResult(steps=steps, tokens=0, seconds=0.0, world_size=world)
    model.train()
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step", leave=False)
    cast = frozen_linears_in_bf16(raw) if (precision != "float32" and cfg.base_dtype == "float32" and not sharded) \
        else contextlib.nullcontext()
    # under autocast every adapter matmul casts its input to bf16 anyway: PEFT's own cast of bf16
    # inputs to the float32 adapter dtype first is an exact round trip, two copies per layer each way
    adapter_casts = adapter_input_casts_off(raw) if precision != "float32" else contextlib.nullcontext()
    blocker = packing_blocker(hf_model(raw), loss_parts, sharded=sharded, stock_path=_stock_path(raw)) \
        if cfg.packing else None
    packed = cfg.packing and blocker is None
    if blocker:
        say(f"training on padded micro-batches (training.packing): {blocker}")
    # padded bf16 rounds on a CPU take the same attention function for its float32 kernel
    cairn_attention = packed or float32_attention_round(hf_model(raw), accelerator.device, precision != "float32")
    packing = packed_attention_enabled(hf_model(raw)) if cairn_attention else contextlib.nullcontext()
    # in one unsharded process, a trainable embedding's gradient is added in place after backward
    # (cairn.train.embedding_grad: no dense vocab-sized buffer per step)
    embedding_grad = deferred_embedding_grad(raw, enabled=world == 1 and not sharded and not deepspeed)
    # LoRA linears as one autograd node each (cairn.train.fused_lora); sharded weights keep PEFT's forward
    lora_nodes = fused_lora_linears(raw) if not sharded else contextlib.nullcontext()
    t0 = t_log = time.perf_counter()
    running: dict[str, float] = {}
    running_n, log_tokens, log_targets = 0, 0, 0
    # A resumed round continues the interrupted one's counters (round.json's tokens, loss log, seconds;
    # the loss sums since the last logging step), so its record equals an uninterrupted round's.
    result.tokens, result.log = resumed.get("tokens", 0), list(resumed.get("log", []))
    seconds_before = resumed.get("seconds", 0.0)
    if "running" in resumed:
        # the saved sums are over every process: one process carries them, so the next reduce adds them once
        running = {k: (v if rank == 0 else 0.0) for k, v in resumed["running"].items()}
        running_n, log_tokens, log_targets = resumed["running_n"], resumed["log_tokens"], resumed["log_targets"]
    try:
        with cast, adapter_casts, packing, lora_nodes, embedding_grad as embedding_sinks:
            for step in range(start, steps):
                micro_ids = [batches[step * cfg.grad_accum + m] for m in range(cfg.grad_accum)]
                step_targets = sum(n_targets[i] for idx in micro_ids for i in idx)
                bad: str | None = None
                for micro, idx in enumerate(micro_ids):
                    mine = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                    rows = [encoded[i] for i in mine]
                    batch = {k: v.to(accelerator.device)
                             for k, v in (collate_packed(rows) if packed else collate(rows, pad_id)).items()}
                    last = micro == cfg.grad_accum - 1
                    sync = contextlib.nullcontext() if (last or world == 1) else accelerator.no_sync(model)
                    with sync:
                        with accelerator.autocast():
                            task_sum, n_local, outputs = answer_token_loss(model, batch, raw=raw, sharded=sharded)
                            outputs.loss = task_sum.detach() / max(n_local, 1)  # local mean, for diagnostics
                            terms = {}
                            for part in loss_parts:
                                terms.update(part.extra_loss(raw, batch, outputs))
                            # DDP averages over processes: scale the summed CE by world / global count
                            loss = task_sum * (world / max(step_targets, 1))
                            if terms:
                                loss = loss + sum(terms.values()) / cfg.grad_accum
                        accelerator.backward(loss * cfg.grad_accum if deepspeed else loss)
                    for sink in embedding_sinks:
                        sink.flush()
                    for name, value in (("task", task_sum), *terms.items()):
                        v = float(value.detach())
                        if not math.isfinite(v) and bad is None:
                            bad = f"{name} = {v}"
                        running[name] = running.get(name, 0.0) + v
                    running_n += 1
                step_tokens = sum(len(encoded[i].input_ids) for idx in micro_ids for i in idx)
                result.tokens += step_tokens
                log_tokens += step_tokens
                log_targets += step_targets
                done = step + 1
                _check_finite(accelerator, bad, done, world)
                if cfg.max_grad_norm and not deepspeed:  # DeepSpeed clips inside its step
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if bar is not None:
                    bar.update(1)
                if done % cfg.log_every == 0 or done == steps:
                    entry = {"step": done, "lr": scheduler.get_last_lr()[0]}
                    entry.update(_reduce_running(accelerator, running, running_n, log_targets, world))
                    for part in loss_parts:  # raw (unweighted) penalty values, when a part reports them
                        if hasattr(part, "diagnostics"):
                            entry.update(part.diagnostics())
                    now = time.perf_counter()
                    entry["tokens_per_second"] = log_tokens / max(now - t_log, 1e-9)
                    t_log, log_tokens, log_targets = now, 0, 0
                    result.log.append(entry)
                    say("step {step}/{total} ".format(step=done, total=steps)
                        + " ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "step"))
                    if log_fn is not None and main:
                        log_fn({k: v for k, v in entry.items() if k != "step"}, done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{entry.get('task', 0.0):.3f}")
                    running, running_n = {}, 0
                if checkpoint_dir is not None and cfg.save_every and done % cfg.save_every == 0 and done < steps:
                    if sharded:
                        if done == cfg.save_every:
                            say("note: resume checkpoints are not written for sharded (FSDP/ZeRO-3) models")
                    else:
                        counters = {"tokens": result.tokens, "log": result.log,
                                    "seconds": seconds_before + time.perf_counter() - t0,
                                    "running": _sum_running(accelerator, running, world), "running_n": running_n,
                                    "log_tokens": log_tokens, "log_targets": log_targets}
                        with dist.main_process_writes() as write:
                            if write:
                                ckpt.save_checkpoint(checkpoint_dir, raw, optimizer, scheduler, done, extra=counters)
                if on_step is not None:
                    on_step(done)
        result.seconds = seconds_before + time.perf_counter() - t0
        if sharded:
            state = accelerator.get_state_dict(model)
            result.state_dict = state if main else None
    finally:
        if bar is not None:
            bar.close()
        restore_model_settings(raw_model, settings)
    model.eval()
    if checkpoint_dir is not None:
        with dist.main_process_writes() as write:
            if write and checkpoint_dir.exists():
                shutil.rmtree(checkpoint_dir)  # the round's artifact supersedes its resume checkpoint
    return result


def _check_finite(accelerator, bad: str | None, step: int, world: int) -> None:
    """Raise TrainingDiverged on every process when any process saw a NaN/Inf term this step."""
    flag = 1.0 if bad else 0.0
    if world > 1:  # all processes must leave together, or the others hang in the next collective
        flag = float(accelerator.reduce(torch.tensor([flag], device=accelerator.device), "sum")[0])
    if flag:
        where = f"loss term {bad}" if bad else "a loss term on another process"
        raise TrainingDiverged(
            f"training diverged at step {step}: {where} (not finite); nothing was saved for this step. "
            f"Lower training.lr, enable training.max_grad_norm, or check the round's data")


def _sum_running(accelerator, running: dict[str, float], world: int) -> dict[str, float]:
    """The loss sums since the last logging step, summed over processes (for a checkpoint; collective)."""
    if world == 1 or not running:
        return dict(running)
    names = sorted(running)
    values = torch.tensor([running[k] for k in names], dtype=torch.float64)
    values = accelerator.reduce(values.to(accelerator.device), "sum").cpu()
    return dict(zip(names, values.tolist()))


def _reduce_running(accelerator, running: dict[str, float], running_n: int, targets: int,
                    world: int) -> dict[str, float]:
    """Mean of each loss term since the last log, over all processes.

    ``task`` is the token-weighted mean CE (summed CE / answer tokens); the other terms are the
    mean over micro-batches and processes.
    """
    names = sorted(running)
    values = torch.tensor([running[k] for k in names], dtype=torch.float64)
    if world > 1:
        values = accelerator.reduce(values.to(accelerator.device), "sum").cpu()
    out = {}
    for name, v in zip(names, values.tolist()):
        out[name] = v / max(targets, 1) if name == "task" else v / max(running_n * world, 1)
    return out
