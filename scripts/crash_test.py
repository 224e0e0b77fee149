"""Kill -9 anywhere: SIGKILL a `cairn run` at random moments, rerun it, compare with an uninterrupted run.

Builds a tiny Llama model folder (and uses the built-in generated demo tasks) in a temp directory,
writes a 3-round config with sequential LoRA, full fine-tuning with replay, O-LoRA, LoRAMoE and a
one-round LoRA method merged by a combine step, and runs it once without interruption (the
reference). Each trial then starts the same command (``python -m cairn.cli run``) in a fresh
directory, kills it with SIGKILL after a random delay, ``--kills`` times, and reruns it until it
exits on its own. The finished directory must equal the reference: every results.json (timings
aside), the results matrices, every predictions.json and every tensor of every saved artifact, bit
for bit (safetensors tensors and round deltas; resume on the same machine and kernels is deterministic), with nothing half-written
(no ``.tmp-*`` left, every round directory finished). Prints a summary: trials, kill moments by phase
(inferred from the run's log at the moment of the kill), identical yes/no. Usage:

    python scripts/crash_test.py [--trials 5] [--kills 3] [--keep DIR] [--seed 0]

Exit status 0 when every trial is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"timing", "seconds", "eval_seconds", "tokens_per_second", "build_seconds"}


def build_model(path: Path) -> Path:
    """A tiny Llama with a character-level tokenizer, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_config(path: Path, model: Path, steps: int) -> Path:
    import yaml

    demo = {"format": "demo", "entities": 3, "max_new_tokens": 4}
    cfg = {
        "name": "crash", "model": str(model), "seed": 0,
        "tasks": [{"name": t, "path": t, **demo} for t in ("zoology", "geography", "inventions")],
        "training": {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "log_every": 1, "max_length": 64,
                     "save_every": 1},
        "evaluation": {"batch_size": 16},
        "methods": [
            {"name": "lora", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
            {"name": "fft", "trainable": "full", "replay": 0.5},
            {"name": "olora", "trainable": "lora", "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
             "olora": {"lambda1": 0.5}},
            {"name": "loramoe", "trainable": "loramoe", "loramoe": {"experts": 2, "rank": 2, "dropout": 0.0}},
            {"name": "one", "trainable": "lora", "strategy": "one-round", "lora": {"r": 2, "alpha": 4,
                                                                                   "dropout": 0.0}},
        ],
        "combine": [{"name": "ties", "source": "one", "kind": "merge", "method": "ties"}],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def command(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cairn.cli", "run", str(cfg), "--out", str(out), "--no-progress"]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.setdefault("OMP_NUM_THREADS", "1")  # same kernels and reduction order in every process
    return e


def temp_files(out: Path) -> set[Path]:
    return set(out.rglob(".tmp-*")) if out.exists() else set()


def phase_of(out: Path, stale: set[Path]) -> str:
    """What the run was doing when it was killed, from its logs' last lines and in-flight temp files."""
    fresh = temp_files(out) - stale
    if fresh:
        return "report writing" if any("report" in p.parts for p in fresh) else "artifact writing"
    logs = sorted(out.rglob("log.txt"), key=lambda p: p.stat().st_mtime) if out.exists() else []
    if not logs:
        return "startup"
    last = logs[-1].read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    line = re.sub(r"^\[[0-9:]+\] ", "", last[0])  # drop the timestamp
    rules = [("evaluating the base", "base evaluation"), (r"round \d+/\d+", "training"), (r"^step ", "training"),
             ("resum|checkpoint", "restore"), ("trained ", "artifact saving / evaluation"), ("restoring", "restore"),
             (r": after ", "between rounds"), (r"merge of|moe of", "combine"), ("already complete", "between methods"),
             (r"^\S+: \S+=\d", "results / report writing"), ("report", "results / report writing")]
    for pattern, name in rules:
        if re.search(pattern, line):
            return name
    return "other"


def run_to_end(cfg: Path, out: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(command(cfg, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def compare(ref: Path, got: Path, metadata: list[str] | None = None) -> list[str]:
    """Differences between two finished run directories (empty: identical).

    Differences of the rounds' training records (step count, tokens, loss log) go to ``metadata``:
    they do not change the model or any score, and are reported on their own line.
    """
    from safetensors.torch import load_file

    metadata = metadata if metadata is not None else []
    problems = []
    partial = [str(p.relative_to(got)) for p in got.rglob(".tmp-*")]
    if partial:
        problems.append(f"half-written files left: {partial[:5]}")
    for rdir in got.glob("*/rounds/*"):
        if rdir.is_dir() and not (rdir / "round.json").is_file():
            problems.append(f"unfinished round directory {rdir.relative_to(got)}")
    ref_files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    got_files = {p.relative_to(got) for p in got.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    skip = {"log.txt"}
    for rel in sorted(ref_files ^ got_files):
        if rel.name not in skip and not rel.parts[0] == "report":
            problems.append(f"file only in {'reference' if rel in ref_files else 'trial'}: {rel}")
    for rel in sorted(ref_files & got_files):
        a, b = ref / rel, got / rel
        if rel.suffix == ".safetensors":
            ta, tb = load_file(str(a)), load_file(str(b))
            if ta.keys() != tb.keys():
                problems.append(f"{rel}: different tensor names")
                continue
            for k in ta:
                if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not (
                        ta[k].reshape(-1).view(__import__("torch").uint8).equal(
                            tb[k].reshape(-1).view(__import__("torch").uint8))):
                    problems.append(f"{rel}: tensor {k} differs")
                    break
        elif rel.suffix == ".delta":  # a full-fine-tuning round stored as a delta: same tensors, same bytes
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{rel} differs")
        elif rel.name in ("results.json", "round.json", "predictions.json", "round_data.json"):
            # artifact paths inside the records name the run directory itself
            ja = json.loads(a.read_text().replace(str(ref), "<RUN>"))
            jb = json.loads(b.read_text().replace(str(got), "<RUN>"))
            if rel.name == "round.json":  # the training record (steps, tokens, loss log) is reported apart
                ta, tb = strip_timing(ja.pop("train", {})), strip_timing(jb.pop("train", {}))
                if ta != tb:
                    diff = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
                    metadata.append(f"{rel}: training record differs in {diff}")
            if strip_timing(ja) != strip_timing(jb):
                problems.append(f"{rel} differs")
        elif rel.suffix == ".csv":
            if a.read_text() != b.read_text():
                problems.append(f"{rel} differs")
    return problems


def trial(cfg: Path, ref: Path, out: Path, kills: int, ref_seconds: float, rng: random.Random) -> dict:
    phases, moments = [], []
    for _ in range(kills):
        delay = rng.uniform(0.5, max(1.0, ref_seconds * 0.8))
        stale = temp_files(out)  # left by an earlier kill: not what this process was doing
        proc = subprocess.Popen(command(cfg, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
            moments.append((round(delay, 1), "finished before the kill"))
            break
        except subprocess.TimeoutExpired:
            phase = phase_of(out, stale)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            phases.append(phase)
            moments.append((round(delay, 1), phase))
    runs = 0
    while True:  # rerun the same command until it completes
        runs += 1
        proc = subprocess.run(command(cfg, out), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=max(600, 5 * ref_seconds))
        if proc.returncode == 0 or runs >= 3:
            break
    metadata: list[str] = []
    problems = compare(ref, out, metadata) if proc.returncode == 0 else [
        f"rerun exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"]
    return {"kills": phases, "moments": moments, "identical": not problems, "problems": problems,
            "metadata": metadata}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial before the run may finish")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: temp)")
    args = ap.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="cairn-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    try:
        model = build_model(root / "model") if not (root / "model" / "config.json").is_file() else root / "model"
        cfg = write_config(root / "crash.yaml", model, args.steps)
        ref = root / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        ref_seconds = run_to_end(cfg, ref, timeout=1800)
        print(f"reference run: {ref_seconds:.0f}s", flush=True)
        results = []
        for t in range(args.trials):
            out = root / f"trial-{t}"
            shutil.rmtree(out, ignore_errors=True)
            res = trial(cfg, ref, out, args.kills, ref_seconds, rng)
            results.append(res)
            print(f"trial {t}: kills at {res['moments']} -> identical: {'yes' if res['identical'] else 'NO'}"
                  + (f" ({'; '.join(res['problems'][:4])})" if res["problems"] else "")
                  + (f"; training records differ: {'; '.join(res['metadata'][:3])}" if res["metadata"] else ""),
                  flush=True)
            if res["identical"] and not res["metadata"] and not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        phases = Counter(p for r in results for p in r["kills"])
        same = sum(r["identical"] for r in results)
        print(f"\nsummary: {len(results)} trials, {sum(phases.values())} kills; kill moments by phase: "
              + ", ".join(f"{k} {v}" for k, v in phases.most_common()))
        print(f"training records (steps/tokens/loss log in round.json) identical: "
              f"{sum(not r['metadata'] for r in results)}/{len(results)}")
        print(f"identical to the uninterrupted run (results, matrices, predictions, every tensor): "
              f"{same}/{len(results)}; nothing half-written: "
              f"{'yes' if not any('half-written' in p for r in results for p in r['problems']) else 'NO'}")
        return 0 if same == len(results) else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
