"""Training throughput of cairn's loop against a plain PEFT + transformers loop, same run.

Both loops train a fresh LoRA adapter (same rank, targets, seed, optimizer, batches) on the built-in
model over the demo tasks' training examples. They alternate in rounds (A B A B ...) so machine noise
hits both alike, and the script prints tokens/s of each and the ratio cairn / plain. Tokens counted
are non-padding tokens in both. Usage:

    python benchmarks/train_loop.py [--model smollm2-135m] [--steps 6] [--repeats 2] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def plain_loop(model, tokenizer, examples, steps: int, batch_size: int, lr: float) -> tuple[int, float]:
    """The loop a PEFT user writes by hand: tokenize, mask the prompt, model(labels=...), AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    tokens = 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        chunk = examples[(step * batch_size) % len(examples):][:batch_size]
        ids, labels = [], []
        for ex in chunk:
            p = tokenizer(ex["prompt"])["input_ids"]
            a = tokenizer(ex["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        label_t = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from cairn.config import LoraConfig, TrainingConfig
    from cairn.data.demo import generate_domain
    from cairn.methods.trainable import add_lora_adapter
    from cairn.models import load_model, load_tokenizer
    from cairn.train.loop import train

    tokenizer = load_tokenizer(args.model)
    examples = generate_domain("zoology", entities=16)["train"]
    lora = LoraConfig(r=16, alpha=32, dropout=0.0)
    cfg = TrainingConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_ratio=0.0,
                         log_every=10**9, max_length=128)
    rates: dict[str, list[float]] = {"cairn": [], "plain": []}
    for r in range(args.repeats):
        for name in ("cairn", "plain") if r % 2 == 0 else ("plain", "cairn"):
            model = add_lora_adapter(load_model(args.model), lora, 1, seed=0)
            if name == "cairn":
                res = train(model, tokenizer, examples, cfg, progress=False, log=lambda s: None)
                tokens, secs = res.tokens, res.seconds
            else:
                tokens, secs = plain_loop(model, tokenizer, examples, args.steps, args.batch_size, 1e-3)
            rates[name].append(tokens / secs)
            print(f"repeat {r} {name:>5}: {tokens} tokens in {secs:.1f}s = {tokens / secs:.1f} tokens/s", flush=True)
    cairn, plain = statistics.median(rates["cairn"]), statistics.median(rates["plain"])
    print(f"\nmedian tokens/s: cairn {cairn:.1f}, plain PEFT loop {plain:.1f}; ratio cairn/plain = {cairn / plain:.2f}x")


if __name__ == "__main__":
    main()
