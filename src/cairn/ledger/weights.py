"""Release weights: fingerprints, building a release's model, and checking semi-cooperative artifacts.

A release is stored as a recipe, not as a copy of the model: its parent plus one artifact (a PEFT
adapter merged into the parent's weights, or a full model that replaces them). Building a release
walks its lineage from the base, verifying every artifact read from the store. A mix release's
artifact is a routed LoRA-MoE (:mod:`cairn.ledger.mix`) built on its host release's weights (its
``settings["host"]``), so it is built from the host, not from its parent; nothing builds on a mixture.

A contribution trained elsewhere must be built on the release it names (``--from``):
- an adapter: ``cairn_release.json`` (written by ``cairn ledger export`` next to the weights a
  contributor trains from, and copied into adapters cairn trains) names the project and release; or
  the adapter's ``base_model_name_or_path`` is a folder whose weights fingerprint equals the
  release's; or it names the project's base model and ``--from`` is ``base``. Then PEFT must load
  it onto the release (module names and shapes).
- a full model: the same config and tensor shapes as the release, and a plausible delta (not
  identical, and no tensor moved further than ``max_relative_delta`` of its norm).

Hand-written: the fingerprint and the checks; PEFT loads and merges the adapters.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from cairn.errors import CairnError

RELEASE_FILE = "cairn_release.json"
#: artifact_kind of a mix release: a routed LoRA-MoE folder (cairn.combine.moe_lora.save_lora_moe)
MIX_KIND = "lora-moe"


def fingerprint_model(model) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def merge_adapter(model, adapter_dir: str | Path):
    """``model`` with the PEFT adapter at ``adapter_dir`` merged into its weights."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CairnError(f"adapter {adapter_dir} does not fit the release's model (module names or shapes "
                         f"differ): {str(exc).splitlines()[0]}") from None
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def build_release(project, release):
    """The model of ``release`` (a row of the releases table), built from the base along its lineage."""
    from cairn.models import load_model

    chain = project.lineage(release)
    mixes = [r for r in chain if r.artifact_kind == MIX_KIND]
    if mixes:
        if mixes[-1].id != release.id:  # refused when contributing; a hand-edited ledger lands here
            raise CairnError(f"release {release.name!r} is built on the mixture {mixes[-1].name!r}; nothing can "
                             "build on a mixture (add experts to it with `cairn ledger mix` instead)")
        return build_mixture(project, release)
    model = load_model(project.base)
    if fingerprint_model(model) != project.meta["base_weights_sha256"]:
        raise CairnError(f"the base model {project.base!r} no longer has the weights recorded at `cairn init` "
                         "(its files changed); restore them or point the project at the original weights")
    for r in chain[1:]:
        if r.artifact_kind is None:
            continue
        with tempfile.TemporaryDirectory(prefix="cairn-release-") as tmp:
            folder = project.store.get_dir(r.artifact_sha, Path(tmp) / "artifact")
            if r.artifact_kind == "adapter":
                model = merge_adapter(model, folder)
            else:
                model = load_model(str(folder))
    model.eval()
    return model


def build_mixture(project, release):
    """A mix release's model: its routed LoRA-MoE (from the store) on its host release's weights."""
    from cairn.combine.moe_lora import load_lora_moe

    host = project.release((release.settings or {}).get("host") or "")
    model = build_release(project, host)
    with tempfile.TemporaryDirectory(prefix="cairn-release-") as tmp:
        folder = project.store.get_dir(release.artifact_sha, Path(tmp) / "artifact")
        model = load_lora_moe(folder, model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def release_stamp(project, release) -> dict:
    return {"project_id": project.meta["project_id"], "project": project.meta["name"], "release": release.name,
            "weights_sha256": (release.settings or {}).get("weights_sha256")}


def _read_stamp(folder: Path) -> dict | None:
    f = folder / RELEASE_FILE
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            raise CairnError(f"{f} is not valid JSON; re-export the release or delete the file") from None
    return None


def _check_stamp(stamp: dict, where: Path, project, parent) -> None:
    if stamp.get("project_id") != project.meta["project_id"]:
        raise CairnError(f"{where} was built on a release of another project ({stamp.get('project')!r}), "
                         f"not of {project.meta['name']!r}; train it from `cairn ledger export {project.path} "
                         f"{parent.name}`")
    if stamp.get("release") != parent.name:
        raise CairnError(f"{where} was built on release {stamp.get('release')!r}, not on --from {parent.name!r}; "
                         f"pass --from {stamp.get('release')} or retrain it from release {parent.name}")


def check_adapter(adapter_dir: Path, project, parent, parent_model) -> dict:
    """Refuse an adapter not built on ``parent``; returns what the check relied on."""
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise CairnError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CairnError(f"{cfg_file} is not valid JSON ({exc.msg})") from None
    base_path = cfg.get("base_model_name_or_path") or ""
    stamp = _read_stamp(adapter_dir)
    if stamp is not None:
        _check_stamp(stamp, adapter_dir, project, parent)
        return {"evidence": f"{RELEASE_FILE} in the adapter", "base_model_name_or_path": base_path}
    folder = Path(base_path).expanduser() if base_path else None
    if folder is not None and folder.is_dir():
        stamp = _read_stamp(folder)
        if stamp is not None:
            _check_stamp(stamp, adapter_dir, project, parent)
            return {"evidence": f"{RELEASE_FILE} of its base folder", "base_model_name_or_path": base_path}
        if (folder / "config.json").is_file():
            from cairn.models import load_model

            got = fingerprint_model(load_model(str(folder)))
            if got != fingerprint_model(parent_model):
                raise CairnError(f"adapter {adapter_dir} was trained on {base_path}, whose weights are not those of "
                                 f"release {parent.name!r} (fingerprint {got[:12]}); retrain it from "
                                 f"`cairn ledger export {project.path} {parent.name}`")
            return {"evidence": "weights fingerprint of its base folder", "base_model_name_or_path": base_path}
    if base_path and base_path == project.base:
        if parent.name != "base":
            raise CairnError(f"adapter {adapter_dir} was trained on the base model {base_path!r}, not on release "
                             f"{parent.name!r}; pass --from base or retrain it from `cairn ledger export "
                             f"{project.path} {parent.name}`")
        return {"evidence": "base_model_name_or_path is the project's base", "base_model_name_or_path": base_path}
    raise CairnError(f"cannot tell which weights adapter {adapter_dir} was built on (base_model_name_or_path="
                     f"{base_path!r} is neither the project's base nor a folder here); train it from a folder "
                     f"written by `cairn ledger export {project.path} {parent.name} --out DIR` (it carries {RELEASE_FILE})")


def check_model(model_dir: Path, project, parent, parent_model, max_relative_delta: float = 0.5):
    """Refuse a full model that is not a plausible fine-tune of ``parent``; returns (model, stats)."""
    from cairn.models import load_model

    if not (model_dir / "config.json").is_file():
        raise CairnError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    stamp = _read_stamp(model_dir)
    if stamp is not None:
        _check_stamp(stamp, model_dir, project, parent)
    model = load_model(str(model_dir))
    a, b = model.config.to_dict(), parent_model.config.to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if a.get(key) != b.get(key):
            raise CairnError(f"model {model_dir} is not built on release {parent.name!r}: config {key} is "
                             f"{a.get(key)!r}, the release has {b.get(key)!r}")
    mine, theirs = model.state_dict(), parent_model.state_dict()
    if set(mine) != set(theirs):
        missing = sorted(set(theirs) ^ set(mine))[:3]
        raise CairnError(f"model {model_dir} has other tensors than release {parent.name!r} (e.g. {missing})")
    worst, moved = 0.0, 0
    for name, t in theirs.items():
        if mine[name].shape != t.shape:
            raise CairnError(f"model {model_dir}: tensor {name} has shape {tuple(mine[name].shape)}, release "
                             f"{parent.name!r} has {tuple(t.shape)}")
        d = (mine[name].float() - t.float()).norm().item()
        moved += d > 0
        worst = max(worst, d / max(t.float().norm().item(), 1e-12))
    if moved == 0:
        raise CairnError(f"model {model_dir} is identical to release {parent.name!r}: it contributes nothing")
    if worst > max_relative_delta:
        raise CairnError(f"model {model_dir} moved a tensor by {worst:.2f} of its norm from release {parent.name!r} "
                         f"(limit {max_relative_delta}); it was likely not fine-tuned from that release")
    return model, {"evidence": "config, shapes and delta", "max_relative_delta": worst, "tensors_changed": moved}


def export_release(project, release, out: Path) -> Path:
    """Write the release's model, the base's tokenizer and ``cairn_release.json`` to ``out``.

    A mix release is written as its host's weights with the mixture in ``out/lora-moe/``
    (``load_lora_moe(out / "lora-moe", AutoModelForCausalLM.from_pretrained(out))`` rebuilds it).
    """
    from cairn import atomic
    from cairn.models import load_tokenizer

    if out.exists():
        raise CairnError(f"{out} exists; pick a new folder for the export")
    tokenizer = load_tokenizer(project.base)
    if release.artifact_kind == MIX_KIND:
        model = build_release(project, project.release(release.settings["host"]))
    else:
        model = build_release(project, release)
    with atomic.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if release.artifact_kind == MIX_KIND:
            project.store.get_dir(release.artifact_sha, tmp / "lora-moe")
        atomic.write_json(tmp / RELEASE_FILE, release_stamp(project, release) | (
            {"mixture": "lora-moe/ on these weights (cairn.combine.moe_lora.load_lora_moe)"}
            if release.artifact_kind == MIX_KIND else {}))
    return out
