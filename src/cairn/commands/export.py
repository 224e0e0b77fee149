"""``cairn export RUN --method M --round K [--merge] --out DIR [--push-to-hub REPO]``.

Writes one round of a run as an artifact anyone can load with plain transformers or PEFT, with a model
card (``README.md``: base model, curriculum, method, the round's scores, cairn version).

What a round's adapter applies to depends on the method, and the export says so:

- ``sequential: merge`` (the seed paper): round k's adapter was trained on base + rounds 1..k-1
  *merged*; that model is never saved by the run. ``--merge`` rebuilds the chain (base, then each
  round's adapter merged in order, then round k's) and writes a full transformers model. Without
  ``--merge`` the adapter is written as is, and ``cairn_parent.json`` plus the card record that it
  applies to base + rounds 1..k-1 merged (for k = 1: the raw base, which vanilla PEFT loads directly).
  The record is a side file, not a key of ``adapter_config.json``: PEFT warns on unknown keys there
  with an "upgrade PEFT" message that would mislead.
- ``sequential: stack``: round k's adapter applies on top of rounds 1..k-1's adapters (all active);
  ``--merge`` merges all k; without it the same record is written.
- ``strategy: one-round``: each round's adapter applies to the raw base.
- full fine-tuning: each round is already a full model (``--merge`` changes nothing); a round stored
  as a delta (``storage.fft_format: delta``) is restored bit-exactly through its parent chain
  (:func:`cairn.io.fft_round.write_round_folder`) and written as a plain safetensors checkpoint.
- LoRAMoE rounds are not a vanilla artifact and are refused.

The output is built in a temporary sibling directory and renamed into place; ``--push-to-hub`` checks
for credentials before anything is written. Hand-written: the card and the chain bookkeeping; the
loading, merging and saving are transformers/PEFT's, the upload huggingface_hub's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

from cairn.errors import CairnError

# Hub ids of the built-in models (their weights here are dequantised from a GGUF: close, not identical)
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PARENT_FILE = "cairn_parent.json"


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export one round of a run as a vanilla model or PEFT adapter with a model card",
        description="Export round K of method M of a run directory as a plain transformers model (--merge) or "
                    "a PEFT adapter, with a model card (README.md). A sequential-merge LoRA round's adapter applies "
                    "to base + the earlier rounds merged: --merge rebuilds that chain; without it the card and "
                    "cairn_parent.json say what the adapter applies to.")
    p.add_argument("run_dir", type=Path, metavar="RUN", help="experiment directory (runs/<name>)")
    p.add_argument("--method", required=True, metavar="M", help="method (or combine step) name in RUN")
    p.add_argument("--round", type=int, required=True, metavar="K", help="round number, 1 = the first round")
    p.add_argument("--seed", type=int, default=None, help="with a multi-seed run: which seed-<S>/ to export")
    p.add_argument("--merge", action="store_true", help="write a full model: the base with rounds 1..K merged")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload DIR to this Hub repo (needs HF_TOKEN or `huggingface-cli login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.set_defaults(func=run)


# -- locating a round ------------------------------------------------------------------------------

def method_dir(run_dir: Path, method: str, seed: int | None = None) -> Path:
    if not run_dir.is_dir():
        raise CairnError(f"run directory {run_dir} does not exist")
    mdir = run_dir / method
    if not mdir.is_dir():
        names = sorted(p.name for p in run_dir.iterdir() if (p / "rounds").is_dir() or any(p.glob("seed-*/rounds")))
        raise CairnError(f"{run_dir} has no method {method!r}; methods here: {', '.join(names) or 'none'}")
    seeds = sorted(p.name for p in mdir.glob("seed-*") if p.is_dir())
    if seed is not None:
        mdir = mdir / f"seed-{seed}"
        if not mdir.is_dir():
            raise CairnError(f"{mdir} does not exist; seeds of {method!r}: {', '.join(seeds) or 'single-seed run'}")
    elif seeds and not (mdir / "rounds").is_dir():
        raise CairnError(f"{method!r} was run with several seeds ({', '.join(seeds)}); choose one with --seed")
    return mdir


def round_dir(mdir: Path, k: int) -> Path:
    rounds = sorted(p for p in (mdir / "rounds").glob("[0-9][0-9]-*") if (p / "round.json").is_file())
    match = [p for p in rounds if p.name.startswith(f"{k:02d}-")]
    if not match:
        have = ", ".join(f"{int(p.name[:2])} ({p.name[3:]})" for p in rounds) or "none finished"
        raise CairnError(f"{mdir} has no finished round {k}; rounds: {have}")
    return match[0]


def adapter_dir(rdir: Path, k: int) -> Path | None:
    """Round ``k``'s PEFT adapter folder: ``adapter/`` itself (a vanilla PEFT adapter) or, in runs written
    before that layout, ``adapter/round<k>/`` (PEFT's folder for a named adapter); None when neither."""
    from cairn.methods.lora import adapter_dir as lora_adapter_dir  # the one definition of both layouts

    folder = lora_adapter_dir(rdir, k)
    return folder if (folder / "adapter_config.json").is_file() else None


def _load_cfg(mdir: Path, run_dir: Path):
    from cairn.config import load_config

    for path in (mdir / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            return load_config(path)
    raise CairnError(f"no config.yaml in {mdir} or {run_dir}; is this a cairn run directory?")


def _base_id(spec: str) -> tuple[str, str]:
    """(id to record as the base, a note for the card)."""
    if spec in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[spec], (f"cairn's built-in `{spec}`: {BUILTIN_HUB_IDS[spec]} dequantised from its "
                                       "Q4_1 GGUF; the Hub weights are the unquantised originals, so an adapter "
                                       "on them gives close, not identical, outputs")
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve()), "a local model folder"
    return spec, "a Hugging Face Hub model"


def _check_credentials(repo: str) -> None:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise CairnError("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    if not get_token():
        raise CairnError(f"--push-to-hub {repo}: no Hugging Face credentials; set HF_TOKEN or run "
                         "`huggingface-cli login`, then rerun (nothing was written)")


# -- the export --------------------------------------------------------------------------------------

def export_round(run_dir: Path, method: str, k: int, out: Path, merge: bool = False, seed: int | None = None,
                 overwrite: bool = False, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Export round ``k`` of ``method`` from ``run_dir`` into ``out``; returns ``out``. See the module doc.

    A LoRA round's adapter is read from ``rounds/NN-<task>/adapter/`` (a vanilla PEFT adapter) or, in
    older runs, ``adapter/round<k>/`` (see :func:`adapter_dir`)."""
    from cairn import __version__, atomic

    run_dir, out = Path(run_dir), Path(out)
    if push_to_hub:
        _check_credentials(push_to_hub)
    if out.exists() and not overwrite:
        raise CairnError(f"{out} exists; choose another --out or pass --overwrite")
    mdir = method_dir(run_dir, method, seed)
    rdir = round_dir(mdir, k)
    cfg = _load_cfg(mdir, run_dir)
    mcfg = next((m for m in cfg.methods if m.name == method), None)
    record = json.loads((rdir / "round.json").read_text(encoding="utf-8"))
    adapter = adapter_dir(rdir, k)
    model_dir = rdir / "model"
    if mcfg is not None and mcfg.trainable == "full" and not model_dir.is_dir():  # [storage helper]
        raise CairnError(f"{model_dir} was removed after its round finished (storage.keep_models: "
                         f"{cfg.storage.keep_models}); rerun with storage.keep_models: all to keep every round")
    if mcfg is None or mcfg.trainable == "loramoe" or not (adapter is not None or model_dir.is_dir()):
        raise CairnError(f"{rdir} holds no vanilla model or LoRA adapter (a LoRAMoE round or a combine step's "
                         "mixture); only LoRA and full fine-tuning rounds can be exported")
    base_id, base_note = _base_id(cfg.model)
    one_round = mcfg.strategy == "one-round"
    kind = "full" if model_dir.is_dir() else "lora"
    parents = [] if one_round or kind == "full" or k == 1 else list(range(1, k))
    mode = mcfg.lora.sequential if kind == "lora" else None
    if kind == "lora" and not merge:
        applies = ("the raw base model" if not parents else
                   f"the base with rounds {parents[0]}..{parents[-1]} " +
                   ("merged into its weights (sequential: merge)" if mode == "merge"
                    else "active as frozen adapters (sequential: stack)"))
    else:
        applies = None
    tasks = [t.name for t in cfg.tasks]
    with atomic.atomic_dir(out, overwrite=overwrite) as tmp:
        if kind == "full":  # the round's transformers checkpoint: copied, or restored from its delta chain
            from cairn.io.fft_round import write_round_folder

            write_round_folder(model_dir, tmp)
            library = "transformers"
        elif merge:
            model, tokenizer = _rebuild_merged(cfg, mcfg, run_dir, mdir, k, one_round, seed)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            library = "transformers"
        else:
            for item in adapter.iterdir():
                if item.name not in ("README.md", PARENT_FILE):  # PEFT's auto card names a local cache path; ours replaces it
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            acfg = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
            acfg["base_model_name_or_path"] = base_id
            (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n", encoding="utf-8")
            from cairn import rundir  # [wire] one definition of cairn_parent.json

            rundir.write_parent(tmp, rundir.parent_record(cfg.model, k, mode, one_round, run_dir, method, seed=seed))
            library = "peft"
        card = model_card(cfg, mcfg, k, record, tasks, base_id, base_note, library, merge or kind == "full",
                          applies, parents, __version__, rdir)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(out), repo_id=push_to_hub,
                          commit_message=f"cairn export: {method} round {k}")
    return out


def _rebuild_merged(cfg, mcfg, run_dir: Path, mdir: Path, k: int, one_round: bool, seed: int | None):
    """The base with rounds 1..k merged (one-round: the base with round k only), and the tokenizer.

    The chain is rebuilt by the method's own ``restore`` (as a resumed run does), so it follows however
    the trainable saved its rounds."""
    from cairn.experiment import Runner
    from cairn.methods.lora import merge_adapters

    runner = Runner(cfg, run_dir, progress=False, echo=False, seed=seed)
    if one_round:
        from peft import PeftModel

        rdir = round_dir(mdir, k)
        model = PeftModel.from_pretrained(runner.load_base(), str(adapter_dir(rdir, k)))
    else:
        method = runner.methods[mcfg.name]
        model = method.restore(runner.context(mcfg, k, lambda line: None), k)
    return merge_adapters(model), runner.tokenizer


def model_card(cfg, mcfg, k, record, tasks, base_id, base_note, library, full, applies, parents, version,
               rdir: Path) -> str:
    import yaml

    meta = {"base_model": base_id, "library_name": library, "tags": ["cairn", "continual-learning"] +
            (["lora"] if library == "peft" else [])}
    scores = record.get("scores") or []
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {cfg.name}: {mcfg.name}, round {k} ({record.get('label', '')})", "",
             f"Exported by cairn {version} from `{rdir}`.", "",
             "## What this is", ""]
    if full:
        lines.append(f"A full transformers model: the base with rounds 1..{k} of `{mcfg.name}` "
                     f"{'(its own round, trained from the base)' if mcfg.strategy == 'one-round' else 'applied'}. "
                     "Load it with `AutoModelForCausalLM.from_pretrained`.")
    else:
        lines.append(f"A PEFT LoRA adapter. It applies to **{applies}**.")
        if parents:
            lines.append(f"Loading it on the raw base with vanilla PEFT gives a different model from the one "
                         f"evaluated below; rebuild the chain with `cairn export ... --round {k} --merge` "
                         f"(see `{PARENT_FILE}`).")
    lines += ["", f"- Base model: `{base_id}` ({base_note})",
              "- Curriculum (round order): " + ", ".join(f"{i}. {t}" + (" **(this round)**" if i == k else "")
                                                         for i, t in enumerate(tasks, start=1)),
              f"- Method: `{mcfg.strategy}`, `trainable: {mcfg.trainable}`"
              + (f", `lora.sequential: {mcfg.lora.sequential}`" if mcfg.trainable == "lora" else ""),
              "", "```yaml", yaml.safe_dump({"method": dataclasses.asdict(mcfg),
                                             "training": dataclasses.asdict(cfg.training_for(mcfg))},
                                            sort_keys=False).rstrip(), "```", "",
              "## Scores after this round", "", "| task | score |", "|---|---|"]
    lines += [f"| {t} | {s:.4f} |" for t, s in zip(tasks, scores)]
    ok = record.get("old_knowledge") or {}
    if ok:
        lines += ["", "Old knowledge (multiple choice):", "", "| task | metric | score | stderr |", "|---|---|---|---|"]
        lines += [f"| {t} | {v.get('primary_metric')} | {v.get('primary', float('nan')):.4f} | "
                  f"{v.get('primary_stderr', float('nan')):.4f} |" for t, v in ok.items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    out = export_round(args.run_dir, args.method, args.round, args.out, merge=args.merge, seed=args.seed,
                       overwrite=args.overwrite, push_to_hub=args.push_to_hub, private=args.private)
    print(f"[cairn] exported {args.method} round {args.round} to {out}"
          + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0
