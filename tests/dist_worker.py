"""Worker for tests/test_dist.py: train a tiny model with cairn's loop, in whatever world it is
launched in (plain python = 1 process, torchrun = several), and save the final trainable weights.

Usage: python dist_worker.py MODE BATCH_SIZE GRAD_ACCUM OUT.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from safetensors.torch import save_file

    from cairn import dist
    from cairn.config import TrainingConfig
    from cairn.methods.lora import LoraConfig, add_lora_adapter
    from cairn.methods.olora import OLoRALoss, collect_lora_A
    from cairn.methods.full import make_full_trainable
    from cairn.train.loop import train
    from conftest import CharTokenizer, make_tiny_llama

    torch.set_num_threads(1)
    if sys.argv[1] == "eval":
        return evaluate(Path(sys.argv[2]))
    if sys.argv[1] == "fsdp":
        return fsdp(Path(sys.argv[2]))
    if sys.argv[1] == "resume":
        return resume(Path(sys.argv[2]))
    mode, batch_size, grad_accum, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    tok = CharTokenizer()
    examples = [{"prompt": f"Q{i}: what is {i}?", "answer": f" a{i % 3}"} for i in range(16)]
    parts = []
    model = make_tiny_llama()
    if mode == "full":
        model = make_full_trainable(model)
    elif mode in ("lora", "replay"):
        model = add_lora_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
        if mode == "replay":  # a replay round: the new task plus a sample of an earlier, longer task
            examples = examples[:10] + [{"prompt": "Old task, much longer prompt " * (1 + i % 3) + f"#{i}:",
                                         "answer": f" old answer {i}"} for i in range(6)]
    elif mode == "olora":
        model = add_lora_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0), 1, 0)
        prev = {1: collect_lora_A(model, "round1")}
        model = add_lora_adapter(model, LoraConfig(r=4, alpha=8, dropout=0.0), 2, 1)
        parts = [OLoRALoss(prev, lambda1=0.5, lambda2=0.01, adapter_name="round2")]
    cfg = TrainingConfig(epochs=2, lr=5e-3, batch_size=batch_size, grad_accum=grad_accum, warmup_ratio=0.25,
                         log_every=1, max_length=48, scheduler="linear")
    lines: list[str] = []
    result = train(model, tok, examples, cfg, seed=3, loss_parts=parts, progress=False, log=lines.append)
    if dist.is_main():
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(out), metadata={"steps": str(result.steps), "world": str(result.world_size),
                                               "lrs": ",".join(f"{e['lr']:.8g}" for e in result.log),
                                               "tokens": str(result.tokens),
                                               "task": ",".join(f"{e['task']:.6g}" for e in result.log)})
        print("\n".join(lines))


def fsdp(out: Path) -> None:
    """Full fine-tuning under FSDP full-shard through Accelerate; the main process saves the full
    state dict as a vanilla checkpoint. Exit code 3 with the message when FSDP cannot run here."""
    import os

    from cairn import dist
    from cairn.config import TrainingConfig
    from cairn.errors import CairnError
    from cairn.methods.full import make_full_trainable
    from cairn.train.loop import train
    from conftest import CharTokenizer, make_tiny_llama

    os.environ.update({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                       "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                       "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                       "FSDP_USE_ORIG_PARAMS": "true", "FSDP_SYNC_MODULE_STATES": "true"})
    model = make_full_trainable(make_tiny_llama())
    examples = [{"prompt": f"Q{i}:", "answer": f" a{i % 3}"} for i in range(8)]
    try:
        result = train(model, CharTokenizer(), examples, TrainingConfig(max_steps=2, batch_size=2, lr=1e-3,
                       max_length=32), progress=False, log=lambda s: None)
    except CairnError as e:
        print(f"CAIRN-ERROR: {e}")
        sys.exit(3)
    if dist.is_main():
        make_tiny_llama().save_pretrained(out, state_dict=result.state_dict)


def resume(out: Path) -> None:
    """Full fine-tuning interrupted after step 5 (checkpoint at 4, between logging steps 3 and 6) and
    resumed, next to the uninterrupted run, in this world; writes both runs' tokens and loss logs."""
    import json

    from cairn import dist
    from cairn.config import TrainingConfig
    from cairn.methods.full import make_full_trainable
    from cairn.train.loop import train
    from conftest import CharTokenizer, make_tiny_llama

    class Interrupt(Exception):
        pass

    def stop_at_5(step):
        if step == 5:
            raise Interrupt

    tok = CharTokenizer()
    examples = [{"prompt": f"Q{i}: what is {i}?", "answer": f" a{i % 3}"} for i in range(16)]
    cfg = TrainingConfig(max_steps=8, lr=5e-3, batch_size=2, grad_accum=2, warmup_ratio=0.0, log_every=3,
                         save_every=2, max_length=48)
    runs = {}
    runs["reference"] = train(make_full_trainable(make_tiny_llama()), tok, examples, cfg, seed=1, progress=False,
                              log=lambda s: None)
    ckpt = out.parent / "ckpt"
    try:
        train(make_full_trainable(make_tiny_llama()), tok, examples, cfg, seed=1, checkpoint_dir=ckpt,
              progress=False, log=lambda s: None, on_step=stop_at_5)
    except Interrupt:
        pass
    dist.barrier()
    runs["resumed"] = train(make_full_trainable(make_tiny_llama()), tok, examples, cfg, seed=1, checkpoint_dir=ckpt,
                            progress=False, log=lambda s: None)
    if dist.is_main():
        out.write_text(json.dumps({k: {"tokens": r.tokens, "log": r.log, "world": r.world_size}
                                   for k, r in runs.items()}))


def evaluate(out: Path) -> None:
    """Sharded generation and multiple-choice scoring; every process gets the full result."""
    import json

    from cairn import dist
    from cairn.eval.generation import generate, stream_size
    from cairn.eval.multiple_choice import score_pairs
    from conftest import CharTokenizer, make_tiny_llama

    if dist.world_size() > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    tok, model = CharTokenizer(), make_tiny_llama()
    # three streams (two for the first process, one for the second), a shared few-shot prefix and
    # stop strings that end rows at different steps, so slots are refilled within each stream
    prompts = [f"Shared examples come first. Question {i}: " + "x" * (i % 5) for i in range(37)]
    assert 2 * stream_size(2) < len(prompts) <= 3 * stream_size(2)
    texts = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, stop=["\n", "g", "z"])
    questions = [[(f"Q{q}: pick", f" {c}" * (1 + q % 2)) for c in "abc"] for q in range(9)]
    scores = score_pairs(model, tok, questions, batch_size=2)
    result = json.dumps({"texts": texts, "scores": scores})
    gathered = dist.gather_objects([result])
    assert all(r == [result] for r in gathered), "processes disagree"
    if dist.is_main():
        out.write_text(result)


if __name__ == "__main__":
    main()
