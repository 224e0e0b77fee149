"""Forward latency and peak memory of LoRA-MoE mixtures against a single LoRA, same input, same run.

Configurations (all on the same base, same input batch, CPU, float32, no grad):
  merged   - one LoRA merged into the base weights (PEFT merge_and_unload): the cost of a plain model
  lora     - one LoRA left unmerged (vanilla PEFT)
  moe4     - cairn LoRA-MoE of 4 adapters, top-2 softmax
  moe8     - cairn LoRA-MoE of 8 adapters, top-2 softmax
Runs are interleaved round-robin (so background load hits all configurations alike) and the median
is reported, with ratios against `merged` and `lora`. Peak memory is the peak of live bytes produced by the
ops of one forward (activations; tracked with a TorchDispatchMode), parameters counted apart.

Usage: python benchmarks/moe.py [--model smollm2-135m|mid] [--batch 2] [--seq 128] [--rank 8] [--repeats 7]
The built-in model is used when it is installed; `--model mid` uses a Llama config of similar shape
built from random weights (no download).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name != "mid":
        from cairn.models import load_model

        return load_model(name).eval(), name
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=12,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), "mid-size Llama config (12 layers, hidden 576, vocab 8192)"


def make_adapters(base, folder: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i in range(count):
        base.load_state_dict(state)
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        peft_model.save_pretrained(folder / f"a{i}", save_embedding_layers=False)
        base = peft_model.unload()
        paths.append(folder / f"a{i}")
    base.load_state_dict(state)
    return paths


class _LiveBytes(TorchDispatchMode):
    """Track bytes of tensors produced during a forward that are still alive; keep the peak.

    Each op output with a new storage is counted until the tensor is garbage-collected (views share
    their base's storage and are not counted twice). Parameters are not op outputs, so this is the
    activation (working) memory of the forward; parameter bytes are reported separately.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key and key not in self.seen:
                    nbytes = t.untyped_storage().nbytes()
                    self.seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, nbytes)
        return out


def peak_forward_bytes(model, ids) -> int:
    mode = _LiveBytes()
    with torch.no_grad(), mode:
        out = model(ids)
        del out
    return mode.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import PeftModel

    from cairn.combine.moe_lora import build_lora_moe

    def fresh():
        return load_base(args.model)[0]

    base, described = load_base(args.model)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), 8, args.rank)
        models = {
            "merged": PeftModel.from_pretrained(fresh(), adapters[0]).merge_and_unload().eval(),
            "lora": PeftModel.from_pretrained(fresh(), adapters[0]).eval(),
            "moe4": build_lora_moe(fresh(), adapters[:4], top_k=2, router_init="random").eval(),
            "moe8": build_lora_moe(fresh(), adapters, top_k=2, router_init="random").eval(),
        }
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(ids)
        for _ in range(args.repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(ids)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_forward_bytes(m, ids) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(f"model: {described}; input {args.batch}x{args.seq} tokens; LoRA rank {args.rank} on {','.join(TARGETS)}; "
          f"torch threads {torch.get_num_threads()}; {args.repeats} interleaved repeats, median")
    print(f"{'config':8} {'latency_ms':>11} {'x merged':>9} {'x lora':>7} {'act_MiB':>9} {'x merged':>9} {'x lora':>7} {'params_M':>9}")
    for k in models:
        print(f"{k:8} {med[k] * 1e3:11.1f} {med[k] / med['merged']:9.3f} {med[k] / med['lora']:7.3f} "
              f"{mem[k] / 2**20:9.1f} {mem[k] / mem['merged']:9.3f} {mem[k] / mem['lora']:7.3f} {params[k] / 1e6:9.2f}")


if __name__ == "__main__":
    main()
