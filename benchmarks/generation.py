"""Long-answer generation: cairn's batched greedy generation against a plain batched ``generate``.

The baseline ("plain") is what a user writes: batches of prompts in input order, left padded,
``model.generate`` with the stop strings (transformers' ``stop_strings``), then the text cut at the
first stop string. With lm-evaluation-harness installed, "lm-eval" is its HF backend's
``generate_until`` on the same prompts and batch size (length-sorted batches, ``generate`` with its
own stop criteria). cairn's :func:`cairn.eval.generation.generate` sorts prompts by length and
checks stop strings per running row; "current" runs it one batch at a time (finished rows leave
the batch, ``continuous=False``), "continuous" refills a finished row's slot with the next prompt
(continuous batching, shared prompt prefix computed once, prompts of unequal length prefilled
padding-free), and ``--wide B`` adds plain generate and continuous batching at a larger batch. All run side by side, the order rotated each repeat, after one warm-up
call; the script prints median seconds, ratios, forward calls (prefills, decode steps) and how many
outputs differ from plain generate's. It then reports, for short answers (1-3 new tokens,
classification-style tasks), cairn's time against the floor of one batched forward of the prompts.

    python benchmarks/generation.py [--model smollm2-135m] [--n 16] [--max-new-tokens 64] [--threads 1]
    python benchmarks/generation.py --prompts gsm8k --data DATA_PACK --n 48 --max-new-tokens 96 --threads 1
    python benchmarks/generation.py --prompts trace --task Py150 --data DATA_PACK --n 16 --max-new-tokens 64

With long prompts (``--prompts trace``: a TRACE task's test prompts, each cut to its last
``--max-prompt-tokens`` tokens as TRACE's evaluation and the paper configs do) the prompts' forward
pass dominates. Every runner must compute it once, in float32 for the same outputs, so the script
also times the prompts' forward with no padding (the cheaper of each prompt alone and padding-free
packed rows of a batch's prompts: the prefill floor) and prints each runner's time as a multiple of
it: plain generate's multiple is the most any generator of the same outputs could gain over plain
generate. For short answers (classification-style tasks: ``--max-new-tokens 3``) the last lines say
which share of cairn's time that forward is.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of mixed length whose answers run long (several sentences), as in MeetingBank/20Minuten."""
    from cairn.data.demo import generate_domain

    pool = generate_domain("zoology", entities=16)["train"] + generate_domain("geography", entities=16)["train"]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        facts = " ".join(f"{s['prompt'].split('Question: ')[-1].split(chr(10))[0]}{s['answer']}."
                         for s in rng.sample(pool, rng.randint(1, 8)))
        out.append(f"Notes: {facts}\n\nWrite a short report about these notes.\nReport:")
    return out


def gsm8k_prompts(data: str, n: int, shots: int = 2) -> list[str]:
    """GSM8K test questions after ``shots`` solved training examples (lm-eval's prompt and stops)."""
    import json
    from pathlib import Path

    from cairn.eval.gsm8k import build_prompt

    read = lambda f: [json.loads(line) for line in (Path(data) / "gsm8k" / f).read_text().splitlines() if line]
    train, test = read("train.jsonl")[:shots], read("test.jsonl")[:n]
    return [build_prompt(row, train) for row in test]


def trace_prompts(data: str, task: str, n: int, max_prompt_tokens: int, tokenizer) -> list[str]:
    """A TRACE task's first ``n`` test prompts (seeded subsample), each cut to its last
    ``max_prompt_tokens`` tokens and decoded back, so every runner is given the same text."""
    from cairn.config import TaskConfig
    from cairn.data.tasks import load_task

    # only test prompts are needed: the test file stands in for the training source too, since some
    # tasks' folders (MeetingBank in the data pack) hold no train.json
    loaded = load_task(TaskConfig(name=task, format="trace", path=f"trace/{task}", train_path=f"trace/{task}/test.json",
                                  metric="accuracy", max_train=1, max_test=n), data_dir=data, seed=0)
    return [tokenizer.decode(tokenizer(ex["prompt"])["input_ids"][-max_prompt_tokens:], skip_special_tokens=True)
            for ex in loaded.test]


def prefill_floor(model, tokenizer, texts, batch_size) -> float:
    """Seconds of the prompts' forward with no padding at all, the cheaper of: each prompt alone,
    and ``batch_size`` prompts at a time laid end to end in one row (each attending only to itself,
    :mod:`cairn.train.packing`), only the last positions' logits. Any generator must compute at
    least this to produce the first tokens. Short prompts make a lone forward call mostly overhead,
    so there the packed rows are the floor; long ones make both about equal."""
    from cairn.eval.continuous import can_prefill_packed
    from cairn.train.packing import pack_sequences, packed_attention_enabled, packed_forward_kwargs

    ids = [tokenizer(text)["input_ids"] for text in texts]
    t0 = time.perf_counter()
    for one in ids:
        with torch.no_grad():
            model(input_ids=torch.tensor([one]), logits_to_keep=1)
    alone = time.perf_counter() - t0
    if not can_prefill_packed(model):
        return alone
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch_size):
        row = pack_sequences(ids[s:s + batch_size])
        cu = row["cu_seq_lens"]
        with torch.no_grad(), packed_attention_enabled(model):
            model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False,
                  **packed_forward_kwargs(cu), logits_to_keep=cu[1:].long() - 1)
    return min(alone, time.perf_counter() - t0)


def plain(model, tokenizer, texts, max_new_tokens, batch_size, stop):
    from cairn.eval.generation import cut_at_stop

    tokenizer.padding_side = "left"
    outs = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=stop or None,
                                 tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            outs.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop))
    return outs


def lm_eval_runner(model, tokenizer, batch_size):
    """lm-evaluation-harness's own ``generate_until`` (HF backend: length-sorted batches through
    ``model.generate`` with its stop-sequence criteria), or None when lm-eval is not installed."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")

    def run(texts, max_new_tokens, stop):
        kwargs = {"until": list(stop), "max_gen_toks": max_new_tokens, "do_sample": False}
        requests = [Instance(request_type="generate_until", doc={}, arguments=(t, dict(kwargs)), idx=i)
                    for i, t in enumerate(texts)]
        return lm.generate_until(requests, disable_tqdm=True)
    return run


class ForwardCounter:
    """Counts the model's forward calls: prefills (several tokens a row) and decode steps (one token)."""

    def __init__(self, model):
        self.prefill = self.decode = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            if ids.shape[1] == 1:
                self.decode += 1
            else:
                self.prefill += 1

    def take(self) -> tuple[int, int]:
        out = (self.prefill, self.decode)
        self.prefill = self.decode = 0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--wide", type=int, default=0,
                    help="also run plain generate and cairn continuous at this batch size; 0: no")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", choices=("reports", "gsm8k", "trace"), default="reports",
                    help="reports: built-in notes->report prompts; gsm8k: GSM8K 2-shot from --data; trace: the "
                         "test prompts of TRACE task --task from --data")
    ap.add_argument("--data", help="the data pack directory (holding gsm8k/ and trace/), for --prompts gsm8k/trace")
    ap.add_argument("--task", default="Py150", help="the TRACE task, for --prompts trace")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024,
                    help="--prompts trace: keep each prompt's last this many tokens (TRACE's max_prompt_len)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a CPU shared with other jobs, 1 avoids "
                         "OpenMP threads waiting on each other at every op, which swamps both timings")
    ap.add_argument("--no-floor", action="store_true", help="skip the short-answer forward-floor report")
    ap.add_argument("--no-lm-eval", action="store_true",
                    help="leave out lm-evaluation-harness's generate_until (run when lm-eval is installed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cairn.eval.generation import generate
    from cairn.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    model.eval()
    if args.prompts == "gsm8k":
        from cairn.eval.gsm8k import STOP

        texts, stop = gsm8k_prompts(args.data, args.n), STOP + [tokenizer.eos_token]
    elif args.prompts == "trace":
        texts, stop = trace_prompts(args.data, args.task, args.n, args.max_prompt_tokens, tokenizer), []
    else:
        texts, stop = prompts(args.n), ["\n\n", "Notes:"]
    bs, k = args.batch_size, args.max_new_tokens
    runs = {"plain": lambda: plain(model, tokenizer, texts, k, bs, stop)}
    harness = None if args.no_lm_eval else lm_eval_runner(model, tokenizer, bs)
    if harness is not None:
        runs["lm-eval"] = lambda: harness(texts, k, stop)
    runs["current"] = lambda: generate(model, tokenizer, texts, k, bs, stop=stop, continuous=False)
    runs["continuous"] = lambda: generate(model, tokenizer, texts, k, bs, stop=stop)
    if args.wide:
        runs[f"plain@{args.wide}"] = lambda: plain(model, tokenizer, texts, k, args.wide, stop)
        runs[f"continuous@{args.wide}"] = lambda: generate(model, tokenizer, texts, k, args.wide, stop=stop)
    # cairn's generate sets this process-wide on a CPU (cairn.cpu_allocator); set here for every
    # runner alike, so the ratios compare the generators, not the allocator
    from cairn.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    # warm-up: first calls pay one-off set-up costs
    generate(model, tokenizer, texts[:2], 2, 2, stop=stop)
    plain(model, tokenizer, texts[:2], 2, 2, stop)
    if harness is not None:
        harness(texts[:2], 2, stop)
    counter = ForwardCounter(model)
    times: dict[str, list[float]] = {name: [] for name in runs}
    results, forwards = {}, {}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each repeat
            counter.take()
            t0 = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - t0)
            forwards[name] = counter.take()
            print(f"repeat {r} {name:>14}: {times[name][-1]:.1f}s", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    lengths = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in results["plain"]]
    print(f"\n{args.n} {args.prompts} prompts, batch {bs}, {k} new tokens max, answers of "
          f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}); "
          f"{sum(n < k - 2 for n in lengths)}/{args.n} stopped early (stop string/EOS)")
    bases = [b for b in ("plain", "lm-eval", "current") if b in runs]
    print(f"{'':>14}  {'seconds':>8}  " + "  ".join(f"{b + '/x':>10}" for b in bases)
          + f"  {'prefills':>8}  {'decode steps':>12}  differ")
    for name in runs:
        differ = sum(a != b for a, b in zip(results[name], results["plain"]))
        print(f"{name:>14}  {med[name]:8.1f}  " + "  ".join(f"{med[b] / med[name]:9.2f}x" for b in bases)
              + f"  {forwards[name][0]:8d}  {forwards[name][1]:12d}  {differ}")
    print("differ: outputs unlike plain generate's (float rounding of differently shaped batches can only "
          "matter on a near-tie of two tokens)")
    fwd = statistics.median(prefill_floor(model, tokenizer, texts, bs) for _ in range(args.repeats))
    ids = [tokenizer(t)["input_ids"] for t in texts]
    prompt_tokens = [len(one) for one in ids]
    print(f"prefill floor (the {statistics.mean(prompt_tokens):.0f}-token prompts' forward without padding, "
          f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens): {fwd:.1f}s; each runner's time in floors: "
          + ", ".join(f"{name} {med[name] / fwd:.2f}" for name in runs)
          + f". No generator of the same outputs can be more than {med['plain'] / fwd:.2f}x plain generate.")
    shared = next((i for i, col in enumerate(zip(*ids)) if len(set(col)) > 1), min(map(len, ids)))
    if shared:
        print(f"the prompts share their first {shared} tokens, which cairn computes once: its time can be "
              f"under this floor")
    if not args.no_floor:
        floor(model, tokenizer, texts, bs, fwd)


def floor(model, tokenizer, texts, batch_size, fwd: float) -> None:
    """Short answers: cairn's generation of 1-3 tokens against the prefill floor (the prompts'
    forward without padding: :func:`prefill_floor`)."""
    from cairn.eval.generation import generate

    for k in (1, 3):
        t0 = time.perf_counter()
        generate(model, tokenizer, texts, k, batch_size)
        g = time.perf_counter() - t0
        print(f"short answers, {k} new token(s): cairn {g:.2f}s vs the prompts' forward without padding "
              f"{fwd:.2f}s -> forward floor share {fwd / g:.0%}")


if __name__ == "__main__":
    main()
