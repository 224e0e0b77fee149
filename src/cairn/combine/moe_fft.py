"""FFT MoE mixing: a base and K models fine-tuned from it become one Mixtral-format mixture.

Implements the FFT variant of MoE mixing in moetify (Lee et al. 2024, arXiv 2408.17280), which the
seed paper (Lee & Wynter 2024) finds best in the semi-cooperative setting. The experts are the K
models' MLPs (Llama gate/up/down with SiLU = Mixtral w1/w3/w2); every other weight (embeddings,
attention, norms, lm_head) comes from the base. Routers: random, or from base hidden states of
positive prompts / last tokens / each expert's training texts (:mod:`cairn.combine.router_init`).

Output: a ``MixtralForCausalLM`` checkpoint that vanilla transformers loads without
trust_remote_code. Tensors are written in the per-expert Mixtral layout
(``block_sparse_moe.gate`` / ``block_sparse_moe.experts.<e>.w1|w2|w3``): it is what Mixtral
checkpoints on the Hub use and what transformers 5 itself writes back on save (it fuses experts
into ``mlp.experts.gate_up_proj`` only in memory, through its conversion mapping), so transformers 4
and 5 both load it. Tied embeddings stay tied (Mixtral honours ``tie_word_embeddings``).

Layers outside ``moe_layers``: Mixtral has one expert count for every layer, so such a layer holds
K copies of the base MLP with a zero router. Any routing then returns the base MLP (top-k weights
sum to 1; exactly for top-k 1, 2 and 4, up to rounding otherwise). It costs storage, not accuracy;
routers of these layers learn nothing useful in router training (all experts agree).

Weights are streamed tensor by tensor from safetensors and written in shards, so memory stays near
one shard plus, for prompt-based routers, one copy of the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cairn import atomic
from cairn.combine import router_init as rinit
from cairn.errors import CairnError
from cairn.io.architecture import architecture_differences
from cairn.io.safetensors import ST_CODES, ST_DTYPES, Checkpoint, ShardedWriter
from cairn.io.same_base import check_same_base, tensor_distance
from cairn.io.support import copy_support_files

SUPPORTED_TYPES = ("llama", "mistral")
MLP_PARTS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
SAME_BASE_TENSOR = "model.layers.0.self_attn.q_proj.weight"
MANIFEST = "moe_manifest.json"


def _resolve(spec: str | Path) -> Path:
    from cairn.models import resolve_model_path

    path = Path(resolve_model_path(str(spec)))
    if not path.is_dir():
        raise CairnError(f"{spec}: FFT MoE mixing needs local model directories (got a hub id?); download it first")
    return path


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CairnError(f"{path}: cannot read config.json ({str(exc).splitlines()[0]})") from None


def _check_configs(base_path: Path, base_cfg, experts: Sequence[tuple[Path, Any]]) -> None:
    if base_cfg.model_type not in SUPPORTED_TYPES:
        raise CairnError(
            f"{base_path}: model_type {base_cfg.model_type!r} is not supported for Mixtral mixing; "
            f"supported: {', '.join(SUPPORTED_TYPES)} (Llama-family MLP and attention)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(base_cfg, flag, False):
            raise CairnError(f"{base_path}: {flag}=true has no place in Mixtral (no biases); cannot mix this model")
    for path, cfg in experts:
        diffs = [f"{key}: {b} vs base {a}" for key, a, b in architecture_differences(base_cfg.to_dict(), cfg.to_dict())]
        if diffs:
            raise CairnError(
                f"expert {path} has a different architecture than the base {base_path} ({'; '.join(diffs)}); "
                "every expert must be fine-tuned from the base"
            )


def _check_same_base(base: Checkpoint, expert: Checkpoint, threshold: float) -> None:
    if SAME_BASE_TENSOR not in base or SAME_BASE_TENSOR not in expert:
        raise CairnError(f"{expert.path}: tensor {SAME_BASE_TENSOR} is missing; is this a Llama-family checkpoint?")
    rel = tensor_distance(base.get(SAME_BASE_TENSOR), expert.get(SAME_BASE_TENSOR))
    check_same_base(rel, threshold, model=str(expert.path), base=str(base.path), tensor=SAME_BASE_TENSOR,
                    raise_hint="raise same_base_threshold")


def _mixtral_config(base_cfg, num_experts: int, top_k: int, dtype: torch.dtype):
    from transformers import MixtralConfig

    rope = getattr(base_cfg, "rope_parameters", None)
    if rope is None:  # transformers 4 style configs
        rope = {"rope_type": "default", "rope_theta": getattr(base_cfg, "rope_theta", 10000.0)}
    cfg = MixtralConfig(
        vocab_size=base_cfg.vocab_size,
        hidden_size=base_cfg.hidden_size,
        intermediate_size=base_cfg.intermediate_size,
        num_hidden_layers=base_cfg.num_hidden_layers,
        num_attention_heads=base_cfg.num_attention_heads,
        num_key_value_heads=base_cfg.num_key_value_heads or base_cfg.num_attention_heads,
        head_dim=getattr(base_cfg, "head_dim", None),
        hidden_act=base_cfg.hidden_act,
        max_position_embeddings=base_cfg.max_position_embeddings,
        initializer_range=getattr(base_cfg, "initializer_range", 0.02),
        rms_norm_eps=base_cfg.rms_norm_eps,
        pad_token_id=getattr(base_cfg, "pad_token_id", None),
        bos_token_id=getattr(base_cfg, "bos_token_id", None),
        eos_token_id=getattr(base_cfg, "eos_token_id", None),
        tie_word_embeddings=bool(getattr(base_cfg, "tie_word_embeddings", False)),
        sliding_window=getattr(base_cfg, "sliding_window", None),
        attention_dropout=getattr(base_cfg, "attention_dropout", 0.0),
        num_experts_per_tok=top_k,
        num_local_experts=num_experts,
        rope_parameters=dict(rope),
    )
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.dtype = str(dtype).removeprefix("torch.")
    return cfg


def _router_weights(
    base_path: Path, tokenizer, num_layers: int, moe_layers: list[int], num_experts: int, hidden: int,
    router_init: str, router_prompts, seed: int,
) -> dict[int, torch.Tensor]:
    routers = {i: torch.zeros(num_experts, hidden) for i in range(num_layers)}
    if router_init == "zeros":
        return routers
    if router_init == "random":
        for i in moe_layers:
            routers[i] = rinit.random_router(num_experts, hidden, seed=seed + i)
        return routers
    from transformers import AutoModelForCausalLM

    from cairn.models import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(str(base_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    try:
        names = [f"model.layers.{i}.mlp" for i in moe_layers]
        vectors = rinit.hidden_state_routers(model, tok, router_prompts, names, rinit.reduce_for(router_init))
    finally:
        del model
    for i, name in zip(moe_layers, names):
        routers[i] = vectors[name]
    return routers


def parameter_counts(
    stem: int, hidden: int, intermediate: int, num_layers: int, num_experts: int, top_k: int, num_moe_layers: int
) -> dict[str, int]:
    """Parameter counts of a Mixtral mixture (stored and active per token)."""
    mlp = 3 * hidden * intermediate
    expert = num_layers * num_experts * mlp
    router = num_layers * num_experts * hidden
    return {
        "stem": stem,
        "expert": expert,
        "router": router,
        "total": stem + expert + router,
        "active": stem + router + num_layers * top_k * mlp,
        "distinct_expert": num_moe_layers * num_experts * mlp + (num_layers - num_moe_layers) * mlp,
    }


def build_fft_moe(
    base: str | Path,
    experts: Sequence[str | Path],
    out: str | Path,
    top_k: int = 2,
    moe_layers: Sequence[int] | None = None,
    router_init: str = "prompts",
    router_prompts: Sequence[Sequence[str]] | None = None,
    overwrite: bool = False,
    tokenizer=None,
    seed: int = 0,
    same_base_threshold: float = 0.5,
    max_shard_bytes: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Write a MixtralForCausalLM mixture of ``experts`` (MLPs) on ``base`` (everything else) to ``out``.

    ``router_prompts``: one list of texts per expert, for router_init "prompts" (token mean),
    "last_token" and "data" (texts sampled from each expert's training data). Returns statistics
    with parameter counts (stem / expert / router / total / active). Nothing is left at ``out`` on
    failure.
    """
    out = Path(out)
    experts = list(experts)
    k = len(experts)
    if k < 1:
        raise CairnError("FFT MoE mixing needs at least one expert model")
    if not 1 <= top_k <= k:
        raise CairnError(f"top_k={top_k} but there are {k} experts; choose 1 <= top_k <= {k}")
    if out.exists() and not overwrite:
        raise CairnError(f"{out} already exists; choose another output directory or pass overwrite=True")
    rinit.check_router_prompts(router_init, router_prompts, k)
    base_path = _resolve(base)
    expert_paths = [_resolve(e) for e in experts]
    base_cfg = _load_config(base_path)
    _check_configs(base_path, base_cfg, [(p, _load_config(p)) for p in expert_paths])
    num_layers = base_cfg.num_hidden_layers
    layers = list(range(num_layers)) if moe_layers is None else sorted(set(int(i) for i in moe_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CairnError(f"moe_layers {bad} out of range: the base has layers 0..{num_layers - 1}")

    base_ck = Checkpoint(base_path)
    expert_cks = [Checkpoint(p) for p in expert_paths]
    try:
        for ck in expert_cks:
            _check_same_base(base_ck, ck, same_base_threshold)
        hidden, inter = base_cfg.hidden_size, base_cfg.intermediate_size
        routers = _router_weights(
            base_path, tokenizer, num_layers, layers, k, hidden, router_init, router_prompts, seed
        )
        dtype = base_ck.get("model.embed_tokens.weight").dtype
        tied = bool(getattr(base_cfg, "tie_word_embeddings", False))
        stem = 0
        code = ST_CODES[dtype]
        stem_names = [n for n in base_ck.keys() if ".mlp." not in n and not (tied and n == "lm_head.weight")]
        plan = [(n, code if ST_DTYPES[base_ck.refs[n].code].is_floating_point else base_ck.refs[n].code,
                 base_ck.shape(n)) for n in stem_names]
        for i in range(num_layers):
            prefix = f"model.layers.{i}"
            plan.append((f"{prefix}.block_sparse_moe.gate.weight", code, (k, hidden)))
            plan += [(f"{prefix}.block_sparse_moe.experts.{e}.{mixtral}.weight", code,
                      base_ck.shape(f"{prefix}.mlp.{llama}.weight"))
                     for e in range(k) for llama, mixtral in MLP_PARTS.items()]
        with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, plan, max_shard_bytes)  # streamed: one tensor in memory at a time
            for name in stem_names:
                tensor = base_ck.get(name)
                stem += tensor.numel()
                writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            for i in range(num_layers):
                prefix = f"model.layers.{i}"
                writer.write(f"{prefix}.block_sparse_moe.gate.weight", routers[i].to(dtype))
                for e in range(k):
                    source = expert_cks[e] if i in layers else base_ck
                    for llama, mixtral in MLP_PARTS.items():
                        tensor = source.get(f"{prefix}.mlp.{llama}.weight").to(dtype)
                        writer.write(f"{prefix}.block_sparse_moe.experts.{e}.{mixtral}.weight", tensor)
            writer.close()
            _mixtral_config(base_cfg, k, top_k, dtype).save_pretrained(str(tmp))
            copy_support_files(base_path, tmp, skip=("config.json", MANIFEST))
            counts = parameter_counts(stem, hidden, inter, num_layers, k, top_k, len(layers))
            stats = {
                "kind": "fft_moe",
                "base": str(base_path),
                "experts": [str(p) for p in expert_paths],
                "num_experts": k,
                "top_k": top_k,
                "moe_layers": layers,
                "router_init": router_init,
                "dtype": str(dtype).removeprefix("torch."),
                "params": counts,
                "out": str(out),
            }
            atomic.write_json(tmp / MANIFEST, stats)
    finally:
        base_ck.close()
        for ck in expert_cks:
            ck.close()
    return stats
