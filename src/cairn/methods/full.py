"""Full fine-tuning (FFT): every weight trains; each round's artifact is the whole model.

The seed paper's sequential FFT (Lee & Wynter 2024, arXiv 2410.13699). By default
(``storage.fft_format: delta``) a round's ``model/`` keeps the config, tokenizer and
``cairn_parent.json`` and its weights as ``model.delta``: the bit-exact XOR delta against the parent
(the previous round, or the base for round 1 and one-round methods; :mod:`cairn.io.delta`), about
half the size of a safetensors copy. Restoring walks the parent chain (:mod:`cairn.io.fft_round`,
shared with eval, export and the ledger importer); combiners get a full folder materialised next to
it (``model-full/``). With ``fft_format: full`` a round is saved with ``save_pretrained``
(safetensors) next to the tokenizer, a folder vanilla transformers loads.
"""

from __future__ import annotations

from pathlib import Path

from cairn import atomic
from cairn.io import fft_round
from cairn.io.delta import DELTA_FILE
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
        # (method dir, round, CPU copy of its weights): the last saved round of a sequential delta-stored
        # run, the next round's delta parent, kept so saving round k does not restore rounds 1..k-1 from disk
        self._saved: tuple | None = None

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
                saved, self._saved = self._saved, None
                if saved is not None and saved[:2] == (ctx.mdir.path, parent_k):
                    parent = saved[2]
                else:
                    parent = self._state(ctx, parent_k)
                del saved
                child = _cpu_copy(model)
            if storage.fft_format == "delta":
                from cairn.models import resolve_model_path

                model.config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
                base = resolve_model_path(ctx.cfg.model)
                base = str(Path(base).resolve()) if Path(base).is_dir() else base  # a relative folder, made absolute
                record["delta"] = fft_round.write_round_delta(tmp / DELTA_FILE, model, parent, child, parent_k,
                                                              ctx.cfg.dtype, base)
                sizes = record["delta"]
                ctx.log(f"round {ctx.k}: model stored as a delta against "
                        f"{'the base' if parent_k == 0 else f'round {parent_k}'}: {sizes['bytes'] / 1e6:.1f} MB "
                        f"({sizes['ratio']:.2f}x smaller than the raw tensors)")
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
            rundir.write_parent(tmp, record)
        if storage.bf16_copy:
            self._bf16_copy(model, ctx, parent, child)
        if storage.fft_format == "delta" and parent_k == ctx.k - 1 and ctx.k < len(ctx.plan):
            self._saved = (ctx.mdir.path, ctx.k, child)  # the next round's parent (the last round keeps none)
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
        return fft_round.cpu_state(self.restore(ctx, upto))

    def restore(self, ctx: RoundContext, upto: int):
        """Round ``upto``'s model, full or delta-stored (:func:`cairn.io.fft_round.load_round`, the one
        definition shared with eval, export, the ledger importer and the ingredients)."""
        if upto == 0:
            return ctx.load_base()
        return fft_round.load_round(ctx.round_dir(upto) / "model", load_base=ctx.load_base, dtype=ctx.cfg.dtype)

    def ingredient(self, rdir: Path, k: int) -> Path:
        """A transformers folder for combiners: the round's ``model/``, or for a delta round a full copy
        materialised once into ``model-full/`` (atomically; the combine step removes it afterwards)."""
        path = rdir / "model"
        if not fft_round.is_delta(path):
            return path
        out = rdir / "model-full"
        if out.is_dir():  # written by atomic_dir: complete when present
            return out
        with atomic.atomic_dir(out, overwrite=True) as tmp:
            fft_round.write_round_folder(path, tmp)
        return out

    def updates(self, ctx: RoundContext, rdirs: list[Path]):
        """Each round's ΔW against the round before (the base for round 1), for the diagnostics."""
        from cairn.eval.round_updates import checkpoint_updates
        from cairn.models import resolve_model_path

        if any((d / "model" / DELTA_FILE).is_file() for d in rdirs):
            return self._delta_updates(ctx, len(rdirs)), None, None
        updates = checkpoint_updates([Path(resolve_model_path(ctx.cfg.model))] + [d / "model" for d in rdirs])
        return updates, None, None

    def _delta_updates(self, ctx: RoundContext, n: int):
        """The same ΔW as :func:`~cairn.eval.round_updates.checkpoint_updates` (2-D block weights, float)
        for delta-stored rounds, from the restored state dicts. Rounds are restored in order on one
        model: a delta against the round before is applied to it (one decode a round, not a chain each)."""
        import torch

        def blocks(state):  # copies: the model's weights change in place below
            return {k: v.to(torch.float32, copy=True) for k, v in state.items()
                    if ".layers." in k and k.endswith(".weight") and v.dim() == 2}

        model = ctx.load_base()
        updates, previous = [], blocks(fft_round.cpu_state(model))
        for k in range(1, n + 1):
            folder = ctx.round_dir(k) / "model"
            if fft_round.is_delta(folder) and fft_round.delta_info(folder)["parent_round"] == k - 1:
                fft_round.apply_delta(model, folder)
            else:
                model = self.restore(ctx, k)
            current = blocks(fft_round.cpu_state(model))
            updates.append({name: current[name] - previous[name] for name in current if name in previous})
            previous = current
        return updates


def _cpu_copy(model) -> dict:
    """The state dict copied to the CPU (a copy even when the model is there: training changes the model
    in place); tensors sharing storage (tied embeddings) stay shared."""
    out, copies = {}, {}
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def _storage(cfg):
    from cairn.config import StorageConfig

    return getattr(cfg, "storage", None) or StorageConfig()


register_trainable("full", FullFineTuning)
