"""LoRA MoE mixing (cairn.combine.moe_lora): routed PEFT adapters on a tiny Llama."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cairn.combine import moe_lora
from cairn.combine.moe_lora import (
    LoRAMoELinear,
    build_lora_moe,
    load_lora_moe,
    lora_moe_layers,
    routing_weights,
    save_lora_moe,
)
from cairn.combine.router_training import LoRAMoEAuxLoss, freeze_all_but_routers, router_parameters
from cairn.errors import CairnError

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
IDS = torch.tensor([[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
WORDS = "the a cat dog sat on mat fish swims in sea bird flies sky code runs fast".split()


def tiny_config(**kw) -> LlamaConfig:
    args = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0)
    args.update(kw)
    return LlamaConfig(**args)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


_STATE: dict = {}


def fresh_base(cfg: LlamaConfig | None = None) -> LlamaForCausalLM:
    cfg = cfg or tiny_config()
    key = cfg.hidden_size
    if key not in _STATE:
        torch.manual_seed(0)
        _STATE[key] = LlamaForCausalLM(cfg).state_dict()
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(_STATE[key])
    return model.eval()


def make_adapter(path: Path, seed: int, r: int = 4, targets=TARGETS, base_name: str = "tiny-base", cfg=None, **kw) -> Path:
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        fresh_base(cfg),
        LoraConfig(r=r, lora_alpha=2 * r + seed, target_modules=list(targets), lora_dropout=0.0, **kw),
    )
    with torch.no_grad():  # a trained-looking adapter: B non-zero
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(path, save_embedding_layers=False)  # no hub lookup of the base name
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("lora")
    return [
        make_adapter(root / "a0", 0, r=4),
        make_adapter(root / "a1", 1, r=2),  # a different rank: padded inside the mixture
        make_adapter(root / "a2", 2, r=4, use_rslora=True),
    ]


class ForcedRouter(nn.Module):
    """Router logits that pick expert j for every token: 0 for j, -inf for the others."""

    def __init__(self, k: int, j: int):
        super().__init__()
        self.k, self.j = k, j

    def forward(self, x):
        logits = torch.full((*x.shape[:-1], self.k), float("-inf"))
        logits[..., self.j] = 0.0
        return logits


_PEFT_LOGITS: dict[str, torch.Tensor] = {}


def peft_logits(adapter: Path) -> torch.Tensor:
    """Logits of vanilla PEFT with this one adapter (cached: loading PEFT models is the slow part)."""
    if str(adapter) not in _PEFT_LOGITS:
        with torch.no_grad():
            _PEFT_LOGITS[str(adapter)] = PeftModel.from_pretrained(fresh_base(), adapter).eval()(IDS).logits
    return _PEFT_LOGITS[str(adapter)]


@pytest.mark.parametrize("top_k,normalisation", [(None, "softmax"), (1, "softmax"), (2, "softmax"), (1, "sigmoid")])
def test_forced_router_reproduces_each_adapter(adapters, top_k, normalisation):
    model = build_lora_moe(fresh_base(), adapters, top_k=top_k, normalisation=normalisation)
    assert len(lora_moe_layers(model)) == 2 * len(TARGETS)
    for j, adapter in enumerate(adapters):
        for layer in lora_moe_layers(model).values():
            layer.router = ForcedRouter(3, j) if normalisation == "softmax" else _SigmoidForced(3, j)
        with torch.no_grad():
            got = model(IDS).logits
        torch.testing.assert_close(got, peft_logits(adapter), atol=1e-5, rtol=0)


class _SigmoidForced(ForcedRouter):
    def forward(self, x):
        logits = torch.full((*x.shape[:-1], self.k), float("-inf"))
        logits[..., self.j] = float("inf")  # sigmoid gates exactly 1 and 0
        return logits


def test_routing_weights_topk_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    e = [math.exp(v) for v in (1.0, 2.0, 3.0, 0.0)]
    p = [v / sum(e) for v in e]
    torch.testing.assert_close(routing_weights(logits, None, "softmax"), torch.tensor([p]))
    top2 = [0.0, p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2]), 0.0]
    torch.testing.assert_close(routing_weights(logits, 2, "softmax"), torch.tensor([top2]))
    torch.testing.assert_close(routing_weights(logits, 1, "softmax"), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    s = [1 / (1 + math.exp(-v)) for v in (1.0, 2.0, 3.0, 0.0)]
    torch.testing.assert_close(routing_weights(logits, 2, "sigmoid"), torch.tensor([[0.0, s[1], s[2], 0.0]]))
    torch.testing.assert_close(routing_weights(logits, None, "sigmoid"), torch.tensor([s]))


def test_batched_layer_matches_per_token_definition():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    A, B = torch.randn(4, 3, 6), torch.randn(4, 5, 3)
    scaling = torch.tensor([0.5, 1.0, 2.0, 4.0])
    router = torch.randn(4, 6)
    layer = LoRAMoELinear(base, A, B, scaling, router, top_k=2, normalisation="softmax")
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        got = layer(x)
        for b in range(2):
            for t in range(7):
                xt = x[b, t]
                probs = torch.softmax(router @ xt, -1)
                top = torch.topk(probs, 2)
                want = base(xt)
                for w, e in zip(top.values / top.values.sum(), top.indices):
                    want = want + w * scaling[e] * (B[e] @ (A[e] @ xt))
                torch.testing.assert_close(got[b, t], want, atol=1e-5, rtol=1e-5)
    assert (layer.last_routing_weights > 0).sum(-1).eq(2).all()


def test_save_and_reload(adapters, tmp_path):
    model = build_lora_moe(fresh_base(), adapters, top_k=2, router_init="random", seed=3)
    with torch.no_grad():
        want = model(IDS).logits
    out = save_lora_moe(model, tmp_path / "mix")
    for i, adapter in enumerate(adapters):  # experts stay PEFT adapters, byte-for-byte tensors
        original, saved = load_file(adapter / "adapter_model.safetensors"), load_file(out / f"experts/{i}/adapter_model.safetensors")
        assert original.keys() == saved.keys()
        assert all(torch.equal(original[k], saved[k]) for k in original)
        PeftModel.from_pretrained(fresh_base(), out / f"experts/{i}")  # vanilla PEFT loads it
    reloaded = load_lora_moe(out, fresh_base())
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, want)
    assert moe_lora.mixture_info(reloaded)["top_k"] == 2
    with pytest.raises(CairnError, match="already exists"):
        save_lora_moe(model, out)


def test_router_training_changes_only_routers(adapters):
    model = build_lora_moe(fresh_base(), adapters, top_k=2, router_init="random")
    routers = freeze_all_but_routers(model)
    assert routers == router_parameters(model) and len(routers) == 2 * len(TARGETS)
    router_ids = {id(p) for p in routers}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    aux = LoRAMoEAuxLoss(coef=0.1)
    opt = torch.optim.AdamW(routers, lr=0.05)
    model.train()
    mask = torch.ones_like(IDS)
    for _ in range(3):
        outputs = model(input_ids=IDS, labels=IDS, attention_mask=mask)
        terms = aux.extra_loss(model, {"attention_mask": mask}, outputs)
        assert terms["router_aux"].item() > 0
        (outputs.loss + terms["router_aux"]).backward()
        opt.step()
        opt.zero_grad()
    changed = 0
    for n, p in model.named_parameters():
        if id(p) in router_ids:
            changed += not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n
    assert changed == len(routers)


def test_prompt_initialised_routers(adapters):
    tok = tiny_tokenizer()
    prompts = [["the cat sat on the mat"], ["fish swims in the sea"], ["code runs fast"]]
    model = build_lora_moe(fresh_base(), adapters, router_init="prompts", router_prompts=prompts, tokenizer=tok)
    from cairn.combine.router_init import hidden_state_routers

    names = list(lora_moe_layers(model))
    expected = hidden_state_routers(fresh_base(), tok, prompts, names, "mean")
    for n, layer in lora_moe_layers(model).items():
        torch.testing.assert_close(layer.router.weight, expected[n])
        torch.testing.assert_close(layer.router.weight.norm(dim=-1), torch.ones(3))


def test_bad_inputs(adapters, tmp_path):
    q_only = make_adapter(tmp_path / "q_only", 5, targets=["q_proj", "v_proj", "up_proj"])
    with pytest.raises(CairnError, match=r"up_proj.*gate_proj|gate_proj.*up_proj") as err:
        build_lora_moe(fresh_base(), [adapters[0], q_only])
    assert "down_proj" in str(err.value)
    other = make_adapter(tmp_path / "other", 6, base_name="another-base")
    with pytest.raises(CairnError, match="different base models"):
        build_lora_moe(fresh_base(), [adapters[0], other])
    with pytest.raises(CairnError, match="top_k=4"):
        build_lora_moe(fresh_base(), adapters, top_k=4)
    big = make_adapter(tmp_path / "big", 7, cfg=tiny_config(hidden_size=64))
    with pytest.raises(CairnError, match="different base model"):
        build_lora_moe(fresh_base(), [big], check_base_name=False)
    with pytest.raises(CairnError, match="router_prompts"):
        build_lora_moe(fresh_base(), adapters, router_init="prompts", router_prompts=[["x"], [""], ["y"]], tokenizer=tiny_tokenizer())
    with pytest.raises(CairnError, match="adapter_config.json is missing"):
        build_lora_moe(fresh_base(), [tmp_path])
