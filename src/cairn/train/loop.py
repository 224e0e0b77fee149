"""The one training loop, on Accelerate, shared by every method.

Methods differ only in what they hand this loop: which parameters require grad (full, LoRA,
routers, LoRAMoE experts), the round's examples (current task, + replay, joint), and optional extra
loss parts — objects with ``extra_loss(model, batch, outputs) -> dict[name, tensor]`` whose terms are
added to the task loss and logged separately every logging step (O-LoRA issue #33 shows why: a
penalty can silently dwarf the task loss).

Details that matter for reproducibility and resume:
- the micro-batch order is a pure function of (seed, epoch), so a resumed run sees the same batches;
- checkpoints store trainable params, optimizer, scheduler and RNG states; rerunning after an
  interruption continues from the last checkpoint and ends with bit-identical weights;
- loss is on answer tokens only (see :mod:`cairn.data.encode`);
- bf16 is autocast (weights stay in their dtype), on CPU and GPU alike, through Accelerate.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from cairn.config import TrainingConfig
from cairn.data.encode import collate, encode_example
from cairn.errors import CairnError
from cairn.train import checkpoint as ckpt


class LossPart(Protocol):
    def extra_loss(self, model, batch: dict, outputs) -> dict[str, torch.Tensor]: ...


def task_loss_of(outputs) -> torch.Tensor | None:
    """The task loss carried by a forward's outputs (a ModelOutput or a mapping), if any."""
    task = getattr(outputs, "loss", None)
    if task is None and isinstance(outputs, dict):
        task = outputs.get("loss")
    return task if isinstance(task, torch.Tensor) else None


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    log: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def answer_only_loss(model, batch: dict):
    """Causal-LM loss computed from logits at answer positions only.

    The stock ``model(..., labels=...)`` projects every position onto the vocabulary (for SmolLM2,
    49k x 576 per token: about a fifth of the forward) although only the few answer tokens carry
    loss. Here the backbone runs once, the final hidden states at positions whose next token is a
    label are gathered, and only those go through the output layer. The value equals the stock
    mean token cross-entropy (tested); models with logit soft-capping use the stock path.
    """
    import torch.nn.functional as F

    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or model.get_output_embeddings() is None:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return outputs.loss, outputs
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1)
    hidden = outputs.hidden_states[-1][:, :-1]           # position t predicts token t+1
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[keep])
    loss = F.cross_entropy(logits.float(), targets[keep])
    outputs.loss = loss
    return loss, outputs


def micro_batch_order(n: int, batch_size: int, total_micro: int, seed: int) -> list[list[int]]:
    """Indices of every micro-batch: epochs of seeded permutations, cut into batches."""
    order: list[int] = []
    epoch = 0
    while len(order) < total_micro * batch_size:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order.extend(torch.randperm(n, generator=gen).tolist())
        epoch += 1
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(total_micro)]


def total_steps(n_examples: int, cfg: TrainingConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(cfg.epochs * per_epoch))


def _accelerator(cfg: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Each round may ask for a different precision; Accelerate keeps a process-wide state.
    AcceleratorState._reset_state(True)
    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available())


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
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``examples`` in place; returns throughput and logs."""
    from transformers import get_scheduler

    if not examples:
        raise CairnError("no training examples for this round; check the task's train split")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CairnError("the model has no trainable parameters for this round")
    loss_parts = list(loss_parts)
    torch.manual_seed(seed)
    accelerator = _accelerator(cfg)
    encoded = [encode_example(tokenizer, ex, cfg.max_length) for ex in examples]
    steps = total_steps(len(encoded), cfg)
    world = accelerator.num_processes
    global_bs = cfg.batch_size * world
    batches = micro_batch_order(len(encoded), global_bs, steps * cfg.grad_accum, seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=int(cfg.warmup_ratio * steps), num_training_steps=steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start = 0
    if checkpoint_dir is not None and ckpt.has_checkpoint(checkpoint_dir):
        start = ckpt.load_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler)["step"]
        log(f"resuming from step {start}/{steps} ({checkpoint_dir})")

    result = TrainResult(steps=steps, tokens=0, seconds=0.0)
    model.train()
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", unit="step", leave=False)
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    running_n = 0
    for step in range(start, steps):
        for micro in range(cfg.grad_accum):
            idx = batches[step * cfg.grad_accum + micro]
            mine = idx[accelerator.process_index * cfg.batch_size:(accelerator.process_index + 1) * cfg.batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate([encoded[i] for i in mine], pad_id).items()}
            with accelerator.autocast():
                task_loss, outputs = answer_only_loss(model, batch)
                terms = {"task": task_loss}
                for part in loss_parts:
                    terms.update(part.extra_loss(model, batch, outputs))
                loss = sum(terms.values())
            accelerator.backward(loss / cfg.grad_accum)
            result.tokens += int(batch["attention_mask"].sum()) * world
            for name, value in terms.items():
                running[name] = running.get(name, 0.0) + float(value.detach())
            running_n += 1
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running.get('task', 0.0) / max(running_n, 1):.3f}")
        if done % cfg.log_every == 0 or done == steps:
            entry = {"step": done, "lr": scheduler.get_last_lr()[0]}
            entry.update({k: v / running_n for k, v in running.items()})
            for part in loss_parts:  # raw (unweighted) penalty values, when a part reports them
                if hasattr(part, "diagnostics"):
                    entry.update(part.diagnostics())
            result.log.append(entry)
            log("step {step}/{total} ".format(step=done, total=steps)
                + " ".join(f"{k}={v:.4g}" for k, v in entry.items() if k != "step"))
            running, running_n = {}, 0
        if checkpoint_dir is not None and cfg.save_every and done % cfg.save_every == 0 and done < steps:
            ckpt.save_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler, done)
        if on_step is not None:
            on_step(done)
    result.seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    model.eval()
    if checkpoint_dir is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)  # the round's artifact supersedes its resume checkpoint
    return result
