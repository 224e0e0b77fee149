"""Training throughput of cairn's loop against HF Trainer + PEFT and a plain hand-written loop.

All three train the same model on the same batches in the same order (fresh LoRA adapter, or every weight) with the same settings (batch,
lr, AdamW, clipping, answer-only loss, no warmup) on the same SFT-shaped data: an instruction and a
few solved examples as the prompt (~60-160 tokens, masked) and a short answer. They alternate in
rounds (A B C, C B A, ...) so machine noise hits all alike; the script prints non-padding tokens/s
of each, the ratios cairn / Trainer+PEFT and cairn / plain loop (and cairn / Trainer+PEFT per
repeat, with its range: the spread says how far the machine's noise moves the ratio), each run's
peak RSS, and the share of the bf16 matmul roofline, measured in the same process, that cairn's
training FLOPs reach
(LoRA: 4 x matmul params per token, full: 6 x; the output layer is left out). With a CUDA GPU it
prints MFU against the GPU's measured bf16 matmul rate the same way.

    python benchmarks/train_loop.py [--modes lora-fp32,lora-bf16,full-fp32,full-bf16] [--steps 4]
    python benchmarks/train_loop.py --processes 2   # 1 vs 2 processes (torchrun, gloo), same global batch
    python benchmarks/train_loop.py --data PACK --task ScienceQA   # a data pack's TRACE task instead

Two rates are printed for every runner: over the whole run, and after the first optimizer step
(set-up and the optimizer's state allocation left out): a long round sees the second.

The built-in data's examples are 60-127 tokens long, so a padded batch of 4 is ~17% pads; a TRACE
task's lengths spread wider (ScienceQA: 50-823 tokens in a 48-example sample), and the printed pad
share says how much cairn's padding-free batches (training.packing) can save.

Timings on a shared machine are noisy: read the ratios, and rerun with more --repeats to be sure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MODES = ("lora-fp32", "lora-bf16", "full-fp32", "full-bf16")
# time.perf_counter() at the end of each optimizer step of the runner that runs now
STAMPS: list[float] = []


def trace_examples(data: str, task: str, n: int = 48, seed: int = 0) -> list[dict]:
    """The first ``n`` training examples (seeded subsample) of a data pack's TRACE task."""
    from cairn.config import TaskConfig
    from cairn.data.tasks import load_task

    loaded = load_task(TaskConfig(name=task, format="trace", path=f"trace/{task}", metric="accuracy", max_train=n,
                                  max_test=1),
                       data_dir=data, seed=seed)
    return [{"prompt": e["prompt"], "answer": e["answer"]} for e in loaded.train]


def sft_examples(n: int = 48, seed: int = 0) -> list[dict]:
    """Prompted examples: an instruction, 2-6 solved questions as context, then the question."""
    from cairn.data.demo import generate_domain

    pool = generate_domain("zoology", entities=16)["train"] + generate_domain("geography", entities=16)["train"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = pool[i % len(pool)]
        shots = rng.sample(pool, rng.randint(2, 6))
        context = "".join(f"{s['prompt']}{s['answer']}\n\n" for s in shots)
        out.append({"prompt": "Answer the question about the fictional world briefly.\n\n" + context + ex["prompt"],
                    "answer": ex["answer"]})
    return out


class PeakRSS:
    """Peak resident memory of this process while inside (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False

        def poll():
            while not self.stop:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.02)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def fresh_model(name: str, mode: str):
    from cairn.methods.full import make_full_trainable
    from cairn.methods.lora import LoraConfig, add_lora_adapter
    from cairn.models import load_model

    model = load_model(name)
    if mode.startswith("lora"):
        return add_lora_adapter(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), 1, 0)
    return make_full_trainable(model)


def encode_all(tokenizer, examples, max_length):
    from cairn.data.encode import encode_example

    return [encode_example(tokenizer, ex, max_length) for ex in examples]


def run_cairn(model, tokenizer, examples, args, bf16: bool, packing: bool = True) -> tuple[int, float]:
    from cairn.config import TrainingConfig
    from cairn.train.loop import train

    cfg = TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup_ratio=0.0,
                         log_every=10**9, max_length=args.max_length, bf16=bf16, max_grad_norm=1.0, packing=packing)
    t0 = time.perf_counter()
    res = train(model, tokenizer, examples, cfg, progress=False, log=lambda s: None,
                on_step=lambda step: STAMPS.append(time.perf_counter()))
    return res.tokens, time.perf_counter() - t0


def _order(n: int, args) -> list[list[int]]:
    """cairn's own seeded micro-batch order (seed 0, one process), fed to every runner."""
    from cairn.train.loop import micro_batch_order

    return micro_batch_order(n, args.batch_size, args.steps, seed=0)


def _batches(encoded, args, pad_id):
    from cairn.data.encode import collate

    for idx in _order(len(encoded), args):
        yield collate([encoded[i] for i in idx], pad_id)


def run_plain(model, tokenizer, examples, args, bf16: bool) -> tuple[int, float]:
    """The loop a PEFT user writes by hand: model(labels=...), AdamW defaults, autocast for bf16."""
    t0 = time.perf_counter()
    encoded = encode_all(tokenizer, examples, args.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = 0
    model.train()
    for batch in _batches(encoded, args, tokenizer.pad_token_id):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        STAMPS.append(time.perf_counter())
        tokens += int(batch["attention_mask"].sum())
    return tokens, time.perf_counter() - t0


def run_trainer(model, tokenizer, examples, args, bf16: bool) -> tuple[int, float]:
    """HF Trainer with its defaults (fused AdamW, linear schedule) on the same batches, same order."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cairn.data.encode import collate

    t0 = time.perf_counter()
    encoded = encode_all(tokenizer, examples, args.max_length)
    # the same batches in the same order as cairn's loop: cairn's order laid out, read sequentially
    rows = [{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels}
            for idx in _order(len(encoded), args) for i in idx]
    counted = [0]

    def collator(feats):
        from cairn.data.encode import Encoded

        batch = collate([Encoded(f["input_ids"], f["labels"]) for f in feats], tokenizer.pad_token_id)
        batch.pop("is_world_knowledge", None)
        counted[0] += int(batch["attention_mask"].sum())
        return batch

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                  learning_rate=1e-4, warmup_steps=0, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                                  report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                  dataloader_num_workers=0, remove_unused_columns=False, max_grad_norm=1.0)
        class InOrder(Trainer):
            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        class Stamp(TrainerCallback):
            def on_step_end(self, *a, **k):
                STAMPS.append(time.perf_counter())

        InOrder(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[Stamp()]).train()
    return counted[0], time.perf_counter() - t0


def _pad_share(lens: list[int], args) -> float:
    """Share of pad positions in the padded micro-batches the benchmark feeds (cairn's seeded order)."""
    total = padded = 0
    for idx in _order(len(lens), args):
        total += sum(lens[i] for i in idx)
        padded += len(idx) * max(lens[i] for i in idx)
    return 1 - total / padded


def matmul_roofline(dtype=torch.bfloat16, seconds: float = 1.5) -> float:
    """Matmul FLOP/s of this machine now in ``dtype``, on shapes like the model's linears."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (8192, 8192, 8192) if device == "cuda" else (2048, 576, 1536)
    a = torch.randn(shape[0], shape[1], dtype=dtype, device=device)
    b = torch.randn(shape[1], shape[2], dtype=dtype, device=device)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - t0)


def matmul_params(model) -> int:
    """Parameters of the transformer blocks' linear layers (the per-token matmul work; LoRA's own
    rank-r factors and the output layer are left out)."""
    from torch import nn

    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and m is not head and min(m.weight.shape) > 64)


def speed(args) -> None:
    from cairn.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    examples = trace_examples(args.data, args.task) if args.data else sft_examples()
    lens = [len(e.input_ids) for e in encode_all(tokenizer, examples, args.max_length)]
    pads = _pad_share(lens, args)
    print(f"data: {len(examples)} SFT examples, {min(lens)}-{max(lens)} tokens (mean {statistics.mean(lens):.0f}), "
          f"padded batches {100 * pads:.0f}% pads; "
          f"batch {args.batch_size}, {args.steps} steps, threads {torch.get_num_threads()}", flush=True)
    from cairn.cpu_allocator import keep_freed_memory

    # cairn sets this for itself when it trains on a CPU; the setting is process-wide, so it is set
    # here for every runner alike: the ratios compare the loops, not the allocator
    if keep_freed_memory():
        print("glibc keeps freed memory for every runner (cairn.cpu_allocator)", flush=True)
    roofs = {"bf16": matmul_roofline(torch.bfloat16), "fp32": matmul_roofline(torch.float32)}
    print(f"matmul rate measured now: bf16 {roofs['bf16'] / 1e9:.1f} GFLOP/s, fp32 {roofs['fp32'] / 1e9:.1f} GFLOP/s "
          f"(CPU capability {torch.backends.cpu.get_cpu_capability()}; without AVX512-BF16/AMX, bf16 matmuls are "
          f"emulated and far slower than fp32)", flush=True)
    def run_cairn_padded(*a):
        return run_cairn(*a, packing=False)

    # cairn-padded: cairn's loop with training.packing off, to show what padding-free batches give
    runners = {"cairn": run_cairn, "cairn-padded": run_cairn_padded, "trainer": run_trainer, "plain": run_plain}
    step_tokens = [sum(lens[i] for i in idx) for idx in _order(len(lens), args)]
    summary = []
    for mode in args.modes.split(","):
        bf16 = mode.endswith("bf16")
        rates: dict[str, list[float]] = {k: [] for k in runners}
        steady: dict[str, list[float]] = {k: [] for k in runners}
        # lowest peak over repeats: glibc keeps freed memory in the process (cairn.cpu_allocator), so a
        # run's RSS also counts what earlier runners freed; the least affected run is the honest one
        peaks: dict[str, int] = {k: 2**62 for k in runners}
        flops_per_token = None
        for r in range(args.repeats):
            names = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in names:
                model = fresh_model(args.model, mode)
                if flops_per_token is None:
                    flops_per_token = (4 if mode.startswith("lora") else 6) * matmul_params(model)
                STAMPS.clear()
                with PeakRSS() as mem:
                    tokens, secs = runners[name](model, tokenizer, examples, args, bf16)
                assert len(STAMPS) == args.steps, (name, len(STAMPS))
                # after the first optimizer step: set-up, optimizer-state allocation and compiling left out
                after_first = sum(step_tokens[1:]) / (STAMPS[-1] - STAMPS[0])
                rates[name].append(tokens / secs)
                steady[name].append(after_first)
                peaks[name] = min(peaks[name], mem.peak)
                print(f"  {mode} repeat {r} {name:>14}: {tokens} tokens in {secs:.1f}s = {tokens / secs:.1f} tok/s, "
                      f"after the first step {after_first:.1f} tok/s, peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)
                del model
        med = {k: statistics.median(v) for k, v in rates.items()}
        med_s = {k: statistics.median(v) for k, v in steady.items()}
        share = med_s["cairn"] * flops_per_token / roofs["bf16"]
        share_own = med_s["cairn"] * flops_per_token / roofs["bf16" if bf16 else "fp32"]
        line = (f"{mode}: whole run: cairn {med['cairn']:.0f} tok/s, Trainer+PEFT {med['trainer']:.0f}, plain "
                f"{med['plain']:.0f}; cairn/Trainer = {med['cairn'] / med['trainer']:.2f}x, cairn/plain = "
                f"{med['cairn'] / med['plain']:.2f}x | after the first step: cairn/Trainer = "
                f"{med_s['cairn'] / med_s['trainer']:.2f}x, cairn/plain = {med_s['cairn'] / med_s['plain']:.2f}x, "
                f"packing gives {med_s['cairn'] / med_s['cairn-padded']:.2f}x")
        # each repeat's cairn and Trainer ran minutes apart at most: their ratio is less exposed to the
        # machine's drift than a ratio of medians; the spread shows how much the noise moves it
        pairs = sorted(c / t for c, t in zip(steady["cairn"], steady["trainer"]))
        line += (f"; per-repeat cairn/Trainer after the first step: median {statistics.median(pairs):.2f}x "
                 f"(range {pairs[0]:.2f}-{pairs[-1]:.2f}x)")
        line += (f"; peak RSS GiB (lowest repeat) cairn {peaks['cairn'] / 2**30:.2f} / "
                 f"Trainer {peaks['trainer'] / 2**30:.2f} / plain {peaks['plain'] / 2**30:.2f}; "
                 f"{'MFU' if torch.cuda.is_available() else 'roofline share'} "
                 f"{100 * share:.0f}% of bf16 matmul, {100 * share_own:.0f}% of this precision's")
        summary.append(line)
        print(line, flush=True)
    print("\nsummary (medians over repeats)\n" + "\n".join(summary))


def processes(args) -> None:
    """1 vs N processes of cairn's loop at the same global batch (torchrun, gloo on CPU)."""
    results = {}
    for nproc in (1, args.processes):
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        worker = [str(Path(__file__).resolve()), "--worker", str(out), "--model", args.model, "--steps", str(args.steps),
                  "--batch-size", str(args.batch_size // nproc), "--modes", args.modes.split(",")[0]]
        cmd = ([sys.executable] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]) + worker
        subprocess.run(cmd, env=env, check=True)
        results[nproc] = json.loads(out.read_text())
        out.unlink()
        print(f"{nproc} process(es): {results[nproc]['tokens']} tokens in {results[nproc]['seconds']:.1f}s = "
              f"{results[nproc]['tokens'] / results[nproc]['seconds']:.1f} tok/s", flush=True)
    r1, rn = (results[n]["tokens"] / results[n]["seconds"] for n in (1, args.processes))
    print(f"\n{args.processes} processes / 1 process = {rn / r1:.2f}x at global batch {args.batch_size} "
          f"({os.cpu_count()} CPU cores: processes split the same cores, so on a small machine this shows the "
          f"cost of gradient all-reduce, not a speed-up; the speed-up needs one device per process)")


def worker(args) -> None:
    from cairn import dist
    from cairn.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    mode = args.modes.split(",")[0]
    model = fresh_model(args.model, mode)
    tokens, secs = run_cairn(model, tokenizer, sft_examples(), args, mode.endswith("bf16"))
    if dist.is_main():
        Path(args.worker).write_text(json.dumps({"tokens": tokens, "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=None, help="a data pack root: train on its TRACE task --task instead")
    ap.add_argument("--task", default="ScienceQA")
    ap.add_argument("--processes", type=int, default=0, help="compare 1 vs N processes instead")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.processes:
        processes(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
