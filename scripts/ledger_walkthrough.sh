#!/usr/bin/env bash
# Walk-through of a model project on the built-in model (SmolLM2-135M): three contributors add the
# three demo domains (invented facts) as LoRA adapters, each trained on their own machine from the
# release they name; the gate rejects a release that makes the model forget what came before.
# Observed on a busy 2-core CPU (max drop 15 points; ~50 min there, ~15 on an idle one): zoology
# accepted (its probe 0 -> 100); geography and inventions, each trained from zoology, both rejected:
# zoology's probe fell 100 -> 62.5 (-37.5, interval [-62.5, -12.5]); sequential LoRA forgets.
#
#   bash scripts/ledger_walkthrough.sh [WORKDIR]      (default: runs/ledger-walkthrough)
#
# Uses `cairn` from PATH (set CAIRN="python -m cairn.cli" to override).
set -euo pipefail
W=${1:-runs/ledger-walkthrough}
CAIRN=${CAIRN:-cairn}
PY=${PYTHON:-python}
mkdir -p "$W"
W=$(cd "$W" && pwd)  # absolute: adapters record the folder they were trained from

# 0. Each contributor's data: the demo domain's training split (kept at home) and its test split
#    (the probe set, handed to the project).
$PY - "$W" <<'PY'
import json, sys
from pathlib import Path
from cairn.data.demo import generate_domain
w = Path(sys.argv[1])
for name in ("zoology", "geography", "inventions"):
    splits = generate_domain(name, seed=0, entities=8)
    d = w / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in splits["train"]))
    (d / "probe.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in splits["test"]))
PY

# 1. The project: base model, gate policy (a probe set may lose at most 15 points).
$CAIRN init "$W/project" --base smollm2-135m --max-drop 15

# A contributor's own training run: a one-task cairn experiment from an exported release.
train_adapter() {  # NAME RELEASE_DIR LR EPOCHS -> prints the adapter folder
  local name=$1 model=$2 lr=$3 epochs=$4
  cat > "$W/$name/train.yaml" <<YAML
name: $name
model: $model
output_dir: $W/$name/runs
tasks:
  - {name: $name, format: demo, path: $name, entities: 8}
training: {epochs: $epochs, batch_size: 16, max_length: 64, lr: $lr}
evaluation: {batch_size: 32}
methods:
  - {name: lora, trainable: lora, diagnostics: false, lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
YAML
  $CAIRN run "$W/$name/train.yaml" --out "$W/$name/runs" --no-progress >&2
  dirname "$(find "$W/$name/runs/lora/rounds" -name adapter_config.json | head -1)"
}

# 2. Ana adds zoology on top of the base.
$CAIRN ledger export "$W/project" base --out "$W/zoology/release"
A=$(train_adapter zoology "$W/zoology/release" 2e-3 6)
$CAIRN contribute "$W/project" --name zoology --from base --adapter "$A" --contributor ana \
  --probe "$W/zoology/probe.jsonl" --probe-metric exact_match --fingerprint-data "$W/zoology"

# 3. Bo adds geography on top of Ana's release. Sequential LoRA overwrites part of what the model
#    knew about Ana's creatures (the seed paper's forgetting): the gate rejects it (exit status 1; the
#    release stays in the ledger, marked rejected, with the table that shows why).
$CAIRN ledger export "$W/project" zoology --out "$W/geography/release"
B=$(train_adapter geography "$W/geography/release" 1e-3 4)
$CAIRN contribute "$W/project" --name geography --from zoology --adapter "$B" --contributor bo \
  --probe "$W/geography/probe.jsonl" --probe-metric exact_match --fingerprint-data "$W/geography" \
  || echo "(geography: rejected by the gate)"

# 4. Cy adds inventions, also on top of Ana's release (a rejected release cannot be built on).
$CAIRN ledger export "$W/project" zoology --out "$W/inventions/release"
C=$(train_adapter inventions "$W/inventions/release" 1e-3 4)
$CAIRN contribute "$W/project" --name inventions --from zoology --adapter "$C" --contributor cy \
  --probe "$W/inventions/probe.jsonl" --probe-metric exact_match --fingerprint-data "$W/inventions" \
  || echo "(inventions: rejected by the gate)"

# 5. Look at it.
$CAIRN ledger "$W/project"
$CAIRN ledger tree "$W/project"
$CAIRN ledger diff "$W/project" zoology geography
$CAIRN ledger show "$W/project" geography
$CAIRN ledger report "$W/project"
