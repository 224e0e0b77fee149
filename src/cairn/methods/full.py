"""Full fine-tuning (FFT): every weight trains; each round's artifact is a transformers checkpoint.

The seed paper's sequential FFT (Lee & Wynter 2024, arXiv 2410.13699). A round is saved with
``save_pretrained`` (safetensors) next to the tokenizer, so every round is a model vanilla
transformers loads; it is also what combiners receive (one full model per task).

With ``storage.fft_format: delta`` a round's ``model/`` keeps the config, tokenizer and
``cairn_parent.json`` but its weights as ``model.delta``: the bit-exact XOR delta against the parent
(the previous round, or the base for round 1 and one-round methods; :mod:`cairn.io.delta`). Restoring
chains from the base; combiners get a full folder materialised next to it (``model-full/``).
"""

from __future__ import annotations

from pathlib import Path

from cairn import atomic
from cairn.errors import CairnError
from cairn.methods.registry import RoundContext, register_trainable


def make_full_trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


class FullFineTuning:
    name = "full"
    persistent_params = True
    ingredient_kind = "model"

    def __init__(self, method) -> None:
        self.method = method

    def prepare(self, model, ctx: RoundContext):
        return make_full_trainable(model)

    def loss_parts(self):
        return []

    def save(self, model, ctx: RoundContext):
        if not ctx.write:  # another process of a multi-process run writes the artifact
            return model
        from cairn import rundir

        storage = _storage(ctx.cfg)
        record = rundir.parent_record(ctx.cfg.model, ctx.k, None, False, method=ctx.method.name)
        with atomic.atomic_dir(ctx.rdir / "model", overwrite=True) as tmp:
            if storage.fft_format == "delta" or storage.bf16_copy:
                parent_k = 0 if ctx.method.strategy == "one-round" else ctx.k - 1
                parent = self._state(ctx, parent_k)
                child = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if storage.fft_format == "delta":
                from cairn.io.delta import DELTA_FILE, write_delta

                model.config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
                # tied weights (lm_head = embed_tokens) once: the delta of the copy would double the file
                sizes = write_delta(tmp / DELTA_FILE, _untied(parent, _tied_names(model)),
                                    _untied(child, _tied_names(model)))
                from cairn.models import resolve_model_path

                record["delta"] = {"file": DELTA_FILE, "parent_round": parent_k, "dtype": ctx.cfg.dtype,
                                   "base_path": str(resolve_model_path(ctx.cfg.model)), **sizes}
                ctx.log(f"round {ctx.k}: model stored as a delta against "
                        f"{'the base' if parent_k == 0 else f'round {parent_k}'}: {sizes['bytes'] / 1e6:.1f} MB "
                        f"({sizes['ratio']:.2f}x smaller than the raw tensors)")
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
            rundir.write_parent(tmp, record)
        if storage.bf16_copy:
            self._bf16_copy(model, ctx, parent, child)
        return model

    def _bf16_copy(self, model, ctx: RoundContext, parent, child) -> None:
        """An extra bf16 checkpoint (``model-bf16/``), with what the rounding costs relative to the update."""
        import json

        import torch

        from cairn.io.delta import bf16_copy_error

        err = bf16_copy_error(parent, child)
        with atomic.atomic_dir(ctx.rdir / "model-bf16", overwrite=True) as tmp:
            model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
        model.to(getattr(torch, ctx.cfg.dtype))
        (ctx.rdir / "model-bf16" / "bf16_error.json").write_text(json.dumps(err, indent=2) + "\n", encoding="utf-8")
        ctx.log(f"round {ctx.k}: bf16 copy: rounding error {err['relative_error']:.3g}x the update's norm, "
                f"{100 * err['erased_fraction']:.1f}% of updated weights back to the parent's bf16 value")

    def _state(self, ctx: RoundContext, upto: int) -> dict:
        """The state dict after round ``upto`` (0: the base) on the CPU, bit-exact."""
        return {k: v.detach().cpu() for k, v in self.restore(ctx, upto).state_dict().items()}

    def restore(self, ctx: RoundContext, upto: int):
        import torch
        from transformers import AutoModelForCausalLM

        if upto == 0:
            return ctx.load_base()
        path = ctx.round_dir(upto) / "model"
        _require_kept(path)
        from cairn import rundir
        from cairn.io.delta import DELTA_FILE, read_delta

        if not (path / DELTA_FILE).is_file():
            return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, ctx.cfg.dtype))
        info = (rundir.read_parent(path) or {}).get("delta") or {}
        model = self.restore(ctx, int(info.get("parent_round", upto - 1)))
        parent = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _load_untied(model, read_delta(path / DELTA_FILE, _untied(parent, _tied_names(model))), path)
        return model

    def ingredient(self, rdir: Path, k: int) -> Path:
        """A transformers folder for combiners: the round's ``model/``, or for a delta round a full copy
        materialised once into ``model-full/`` (atomically; :func:`cleanup_ingredient` removes it)."""
        path = rdir / "model"
        from cairn.io.delta import DELTA_FILE

        if not (path / DELTA_FILE).is_file():
            return path
        out = rdir / "model-full"
        if (out / "model.safetensors").is_file():
            return out
        import shutil

        import torch
        from transformers import AutoModelForCausalLM

        from cairn import rundir
        from cairn.io.delta import read_delta

        info = rundir.read_parent(path)["delta"]
        if int(info["parent_round"]) != 0:
            raise CairnError(f"{path}: a delta against round {info['parent_round']}; only one-round (base-parented) "
                             "rounds are combine ingredients")
        model = AutoModelForCausalLM.from_pretrained(info["base_path"], dtype=getattr(torch, info["dtype"]))
        parent = {n: v.detach().cpu() for n, v in model.state_dict().items()}
        _load_untied(model, read_delta(path / DELTA_FILE, _untied(parent, _tied_names(model))), path)
        with atomic.atomic_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            for item in path.iterdir():
                if item.name != DELTA_FILE and item.name not in ("config.json", "generation_config.json"):
                    shutil.copy2(item, tmp / item.name)
        return out

    def updates(self, ctx: RoundContext, rdirs: list[Path]):
        """Each round's ΔW against the round before (the base for round 1), for the diagnostics."""
        from cairn.eval.round_updates import checkpoint_updates
        from cairn.models import resolve_model_path

        from cairn.io.delta import DELTA_FILE

        if any((d / "model" / DELTA_FILE).is_file() for d in rdirs):
            return self._delta_updates(ctx, len(rdirs)), None, None
        updates = checkpoint_updates([Path(resolve_model_path(ctx.cfg.model))] + [d / "model" for d in rdirs])
        return updates, None, None

    def _delta_updates(self, ctx: RoundContext, n: int):
        """The same ΔW as :func:`~cairn.eval.round_updates.checkpoint_updates` (2-D block weights, float)
        for delta-stored rounds, from the restored state dicts."""
        def blocks(state):
            return {k: v.float() for k, v in state.items() if ".layers." in k and k.endswith(".weight") and v.dim() == 2}

        updates, previous = [], blocks(self._state(ctx, 0))
        for k in range(1, n + 1):
            current = blocks(self._state(ctx, k))
            updates.append({name: current[name] - previous[name] for name in current if name in previous})
            previous = current
        return updates


def _tied_names(model) -> dict[str, str]:
    """{output embedding weight: input embedding weight} when the config ties them (SmolLM2, Llama-3.2...)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or in_emb is None or id(out_emb) not in names or id(in_emb) not in names:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def _untied(state: dict, tied: dict[str, str]) -> dict:
    """The state without tied copies that equal their source (a copy that differs is kept)."""
    return {n: t for n, t in state.items()
            if not (n in tied and tied[n] in state and torch_equal(t, state[tied[n]]))}


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _load_untied(model, state: dict, where: Path) -> None:
    """Load a state dict stored with tied weights once; a tied copy left out gets its source's values."""
    tied = _tied_names(model)
    for name, source in tied.items():
        if name not in state and source in state:
            state[name] = state[source]
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise CairnError(f"{where}: the stored delta does not match the model (missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); was the base model changed?")


def _storage(cfg):
    from cairn.config import StorageConfig

    return getattr(cfg, "storage", None) or StorageConfig()


def _require_kept(path: Path) -> None:
    if not path.is_dir():
        raise CairnError(f"{path} is missing: its round finished, but the model was removed (storage.keep_models "
                         "policy, or deleted by hand); rerun with storage.keep_models: all to keep every round")


register_trainable("full", FullFineTuning)
