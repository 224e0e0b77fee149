"""FFT MoE mixing into a Mixtral checkpoint (cairn.combine.moe_fft) on tiny Llama models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cairn.combine import router_init as rinit
from cairn.combine.moe_fft import build_fft_moe
from cairn.combine.router_training import MixtralAuxLoss, freeze_all_but_routers, router_parameters
from cairn.errors import CairnError

WORDS = "the a cat dog sat on mat fish swims in sea bird flies sky code runs fast money bank rate".split()


def tiny_config(**kw) -> LlamaConfig:
    args = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    args.update(kw)
    return LlamaConfig(**args)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def perturbed(base: LlamaForCausalLM, seed: int, scale: float = 0.002) -> LlamaForCausalLM:
    model = LlamaForCausalLM(base.config)
    model.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fft")
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    experts = []
    for j in range(3):
        perturbed(base, seed=10 + j).save_pretrained(root / f"expert{j}")
        experts.append(root / f"expert{j}")
    return {"root": root, "base": root / "base", "experts": experts}


PROMPTS = [["the cat sat on the mat", "a dog sat"], ["fish swims in the sea"], ["code runs fast", "bank rate money"]]
IDS = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]])


class ReferenceMoE(nn.Module):
    """Mixtral's block written out per token: softmax, top-k, renormalise, weighted expert sum."""

    def __init__(self, experts: list[nn.Module], gate: torch.Tensor, top_k: int):
        super().__init__()
        self.experts, self.gate, self.top_k = nn.ModuleList(experts), gate, top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            probs = torch.softmax(flat[t] @ self.gate.T, dim=-1)
            top = torch.topk(probs, self.top_k)
            weights = top.values / top.values.sum()
            for w, e in zip(weights, top.indices):
                out[t] += w * self.experts[int(e)](flat[t : t + 1])[0]
        return out.reshape(x.shape)


def load_llama(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_prompt_routed_mixture_reloads_with_vanilla_transformers(models, tmp_path):
    out = tmp_path / "moe"
    stats = build_fft_moe(models["base"], models["experts"], out, top_k=2, router_init="prompts", router_prompts=PROMPTS)
    mixed, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(mixed).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert mixed.config.num_local_experts == 3 and mixed.config.num_experts_per_tok == 2
    assert mixed.config.tie_word_embeddings is True
    assert (out / "tokenizer.json").is_file()  # tokenizer files travel with the mixture

    # the same network written by hand: base Llama with each MLP replaced by a per-token MoE
    tensors = load_file(out / "model.safetensors")
    reference = load_llama(models["base"])
    experts = [load_llama(p) for p in models["experts"]]
    for i, layer in enumerate(reference.model.layers):
        gate = tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        assert torch.allclose(gate.norm(dim=-1), torch.ones(3), atol=1e-5)  # prompt rows are L2-normalised
        layer.mlp = ReferenceMoE([e.model.layers[i].mlp for e in experts], gate, top_k=2)
    with torch.no_grad():
        torch.testing.assert_close(mixed.eval()(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=0)
    assert stats["params"]["total"] == sum(p.numel() for p in mixed.parameters())


def test_forced_router_reproduces_each_expert(models, tmp_path):
    out = tmp_path / "moe"
    build_fft_moe(models["base"], models["experts"], out, top_k=1, router_init="random")
    mixed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    class ForcedGate(nn.Module):
        def __init__(self, j):
            super().__init__()
            self.j = j

        def forward(self, h):
            n = h.reshape(-1, h.shape[-1]).shape[0]
            return torch.zeros(n, 3), torch.ones(n, 1), torch.full((n, 1), self.j)

    base_state = load_llama(models["base"]).state_dict()
    for j, expert_path in enumerate(models["experts"]):
        for layer in mixed.model.layers:
            layer.mlp.gate = ForcedGate(j)
        expected = load_llama(models["base"])
        expert_state = load_llama(expert_path).state_dict()
        expected.load_state_dict({k: (expert_state[k] if ".mlp." in k else v) for k, v in base_state.items()})
        with torch.no_grad():
            torch.testing.assert_close(mixed(IDS).logits, expected(IDS).logits, atol=1e-6, rtol=0)


def test_non_moe_layers_hold_the_base_mlp_and_counts(models, tmp_path):
    cfg = tiny_config()
    d, inter, layers, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, 3
    stats = build_fft_moe(models["base"], models["experts"], tmp_path / "none", top_k=2, moe_layers=[], router_init="random")
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "none", dtype=torch.float32).eval()
    with torch.no_grad():  # every layer non-MoE: the mixture is the base model. The Mixtral block and the
        # Llama MLP are different kernels (their matmuls may block and round differently per CPU), so this
        # compares within float32 rounding, as the MoE-layer test above does.
        torch.testing.assert_close(mixed(IDS).logits, load_llama(models["base"])(IDS).logits, atol=1e-6, rtol=0)

    stats = build_fft_moe(models["base"], models["experts"], tmp_path / "one", top_k=2, moe_layers=[1], router_init="random")
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    stem = cfg.vocab_size * d + layers * (d * d * 2 + d * kv * 2 + 2 * d) + d  # embed, attn, norms, final norm
    mlp = 3 * d * inter
    assert stats["params"] == {
        "stem": stem,
        "expert": layers * k * mlp,
        "router": layers * k * d,
        "total": stem + layers * k * mlp + layers * k * d,
        "active": stem + layers * k * d + layers * 2 * mlp,
        "distinct_expert": 1 * k * mlp + 1 * mlp,
    }
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    base_tensors = load_file(models["base"] / "model.safetensors")
    for e in range(k):
        assert torch.equal(tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"],
                           base_tensors["model.layers.0.mlp.gate_proj.weight"])
    assert torch.count_nonzero(tensors["model.layers.0.block_sparse_moe.gate.weight"]) == 0


def test_router_training_changes_only_routers(models, tmp_path):
    build_fft_moe(models["base"], models["experts"], tmp_path / "moe", top_k=2, router_init="random")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    aux = MixtralAuxLoss(coef=0.1)
    aux.prepare(model)
    routers = freeze_all_but_routers(model)
    assert len(routers) == 2 and routers == router_parameters(model)
    router_ids = {id(p) for p in routers}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(routers, lr=0.05)
    model.train()
    for _ in range(3):
        outputs = model(input_ids=IDS, labels=IDS, attention_mask=torch.ones_like(IDS))
        terms = aux.extra_loss(model, {"input_ids": IDS}, outputs)
        assert set(terms) == {"router_aux"} and terms["router_aux"].item() > 0
        (outputs.loss + sum(terms.values())).backward()
        opt.step()
        opt.zero_grad()
    changed = 0
    for n, p in model.named_parameters():
        if id(p) in router_ids:
            changed += not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n
    assert changed == 2


def test_bad_inputs_fail_cleanly(models, tmp_path):
    out = tmp_path / "moe"
    with pytest.raises(CairnError, match="top_k=4"):
        build_fft_moe(models["base"], models["experts"], out, top_k=4, router_init="random")
    # an expert of another architecture
    LlamaForCausalLM(tiny_config(hidden_size=48)).save_pretrained(tmp_path / "other_arch")
    with pytest.raises(CairnError, match="hidden_size"):
        build_fft_moe(models["base"], [models["experts"][0], tmp_path / "other_arch"], out, router_init="random")
    # same architecture, but trained from another base
    torch.manual_seed(123)
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "other_base")
    with pytest.raises(CairnError, match="does not look fine-tuned"):
        build_fft_moe(models["base"], [models["experts"][0], tmp_path / "other_base"], out, router_init="random")
    with pytest.raises(CairnError, match="router_prompts"):
        build_fft_moe(models["base"], models["experts"], out, router_init="prompts", router_prompts=[["a"], [], ["b"]])
    with pytest.raises(CairnError, match="unknown router_init"):
        build_fft_moe(models["base"], models["experts"], out, router_init="magic")
    assert not out.exists() and not list(tmp_path.glob(".tmp-moe-*"))
    out.mkdir()
    with pytest.raises(CairnError, match="already exists"):
        build_fft_moe(models["base"], models["experts"], out, router_init="random")


class _Toy(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(table)
        self.proj = nn.Linear(table.shape[1], 2)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(self.emb(input_ids))


def test_hidden_state_router_rows_by_hand():
    tok = tiny_tokenizer()
    table = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3) % 7 - 3
    toy = _Toy(table)
    ids = [tok(p)["input_ids"] for p in ("the cat sat", "fish")]
    mean_expected = (table[ids[0]].mean(0) + table[ids[1]].mean(0)) / 2
    last_expected = (table[ids[0][-1]] + table[ids[1][-1]]) / 2
    rows = rinit.hidden_state_routers(toy, tok, [["the cat sat", "fish"], ["fish"]], ["proj"], "mean")["proj"]
    torch.testing.assert_close(rows[0], mean_expected / mean_expected.norm())
    torch.testing.assert_close(rows[1], table[ids[1]].mean(0) / table[ids[1]].mean(0).norm())
    last = rinit.hidden_state_routers(toy, tok, [["the cat sat", "fish"]], ["proj"], "last")["proj"][0]
    torch.testing.assert_close(last, last_expected / last_expected.norm())
    neg = rinit.hidden_state_routers(toy, tok, [["the cat sat"]], ["proj"], "mean", negative_prompts=["fish"])["proj"][0]
    diff = table[ids[0]].mean(0) - table[ids[1]].mean(0)
    torch.testing.assert_close(neg, diff / diff.norm())
