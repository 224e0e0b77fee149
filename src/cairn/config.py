"""Typed experiment configuration: YAML in, dataclasses out, unknown keys rejected.

An experiment is a curriculum of tasks, a base model, shared training/evaluation settings and one or
more methods that each run the curriculum from the same base. Every section is a dataclass whose
field docstrings (the ``help`` metadata) document the key. Loading rejects a key that does not exist
with a message naming the key, its section and the file, and ``--set a.b=c`` overrides any value
(list items by index: ``--set methods.0.training.lr=1e-4``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cairn.errors import CairnError


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    if default is dataclasses.MISSING:
        return field(metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TaskConfig:
    name: str = _help("Task name, used in tables and directory names.")
    format: Literal["trace", "jsonl", "hf", "demo"] = _help(
        "trace: folder with train/eval/test.json lists of {prompt, answer}; jsonl: folder with "
        "train/eval/test.jsonl; hf: a Hugging Face dataset id; demo: a built-in generated domain.",
        "trace",
    )
    path: str | None = _help("Folder (trace/jsonl), dataset id (hf) or demo domain name (demo). "
                             "Relative folders are resolved against the experiment's data_dir.", None)
    metric: str | None = _help("Metric name (see cairn.eval.metrics). Required except for demo tasks.", None)
    prompt_field: str = _help("Field holding the prompt (jsonl/hf).", "prompt")
    answer_field: str = _help("Field holding the answer (jsonl/hf).", "answer")
    type_field: str | None = _help("Optional per-example field marking world-knowledge examples (LoRAMoE).", None)
    world_knowledge: bool = _help("Whether this task counts as world-knowledge-like (LoRAMoE's constraint).", False)
    train_split: str = _help("Split used for training.", "train")
    test_split: str = _help("Split used for evaluation after each round.", "test")
    max_train: int | None = _help("Keep at most this many training examples (seeded subsample).", None)
    max_test: int | None = _help("Evaluate on at most this many test examples (seeded subsample).", None)
    max_new_tokens: int | None = _help("Generation budget at evaluation; default from the longest answer.", None)
    stop: list[str] = _help("Strings that end a generated answer at evaluation (besides EOS).", factory=list)
    seed: int = _help("Seed of a generated (demo) task.", 0)
    entities: int = _help("Number of invented entities of a generated (demo) task.", 8)


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", 8)
    alpha: float = _help("LoRA alpha (scaling = alpha / r).", 16.0)
    dropout: float = _help("LoRA dropout.", 0.05)
    target_modules: list[str] | str = _help("Modules to adapt, or 'all-linear'.", "all-linear")
    sequential: Literal["merge", "stack"] = _help(
        "merge: merge each round's adapter into the weights and start a fresh one (the seed paper); "
        "stack: keep earlier adapters as a frozen stack (O-LoRA's original code).",
        "merge",
    )


@dataclass
class TrainingConfig:
    epochs: float = _help("Passes over the round's training data.", 1.0)
    max_steps: int | None = _help("Stop after this many optimizer steps (overrides epochs).", None)
    lr: float = _help("Peak learning rate.", 1e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    batch_size: int = _help("Examples per micro-batch on each process (the global batch is batch_size x "
                            "processes x grad_accum; steps and epochs count global batches).", 8)
    grad_accum: int = _help("Micro-batches per optimizer step.", 1)
    warmup_ratio: float = _help("Fraction of steps with linear warmup.", 0.1)
    scheduler: Literal["linear", "cosine", "constant"] = _help("LR schedule after warmup.", "linear")
    max_length: int = _help("Truncate prompt+answer to this many tokens (prompt cut from the left).", 512)
    max_grad_norm: float | None = _help("Gradient clipping norm (null: off).", 1.0)
    bf16: bool = _help("bf16 autocast (CPU and GPU); frozen Linear weights are held in bf16 during the round.", False)
    log_every: int = _help("Log loss terms every N optimizer steps.", 10)
    save_every: int | None = _help("Checkpoint every N optimizer steps for resume (null: only at the end).", None)
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass (less memory, ~30% more compute); for large models.", False)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _help(
        "Attention kernel: auto (the model's default), sdpa, eager, or flash_attention_2 (needs the "
        "flash-attn package and a GPU).", "auto")
    base_dtype: Literal["float32", "bfloat16"] = _help(
        "dtype of the FROZEN base weights during LoRA-style training (trainable adapters stay float32); "
        "bfloat16 halves their memory and implies bf16 autocast.", "float32")
    load_in_4bit: bool = _help(
        "Load the frozen base quantised to 4-bit NF4 (QLoRA; LoRA methods only; needs the `quant` extra: "
        "bitsandbytes).", False)
    group_by_length: bool = _help(
        "Within each window of 64 micro-batches of the seeded order, put examples of similar length "
        "together (less padding; the examples of each optimizer step are unchanged up to the window).", False)


@dataclass
class OLoRAConfig:
    lambda1: list[float] | float = _help("Orthogonality weight; a list gives one value per round.", 0.5)
    lambda2: float = _help("Weight of the unsquared L2 norm of the new adapter.", 0.0)


@dataclass
class NLoRAConfig:
    lam: list[float] | float = _help(
        "L1 sparsity weight on ΔW=B·A summed over every entry of every adapted module (the paper's "
        "definition); a list gives one value per round. The reference scripts' 0.4-1.8 weight an r×r "
        "product and are far too strong here: ~1e-4 suits a 135M model with all-linear LoRA.", 1e-4)


@dataclass
class LoRAMoEConfig:
    experts: int = _help("LoRA experts per MLP linear.", 8)
    rank: int = _help("Rank of each expert.", 4)
    alpha: float = _help("LoRA alpha of each expert.", 32.0)
    dropout: float = _help("Dropout on the experts' input.", 0.05)
    top_k: int | None = _help("Route each token to its top-k experts (null: dense softmax, the paper).", None)
    beta: float = _help("Weight of the localized balancing constraint.", 0.1)
    delta: float = _help("Importance up/down-weighting of the matching/other half of the experts.", 0.1)


@dataclass
class MethodConfig:
    name: str = _help("Label of this method; its results go to <output_dir>/<name>.")
    strategy: Literal["sequential", "joint", "one-round"] = _help(
        "sequential: one round per task, each from the previous round's model; "
        "joint: all tasks at once, one round; one-round: each task trained from the base separately "
        "(the seed paper's one-round models, the ingredients of merging and MoE mixing).",
        "sequential",
    )
    trainable: Literal["full", "lora", "loramoe"] = _help(
        "full fine-tuning, LoRA (PEFT), or LoRAMoE (LoRA experts + router on the MLPs, backbone frozen; "
        "the experts persist and keep training across rounds).", "lora")
    lora: LoraConfig = _help("LoRA settings (trainable: lora).", factory=LoraConfig)
    replay: float = _help("Fraction of the round's size replayed from each earlier task (0: off).", 0.0)
    joint_upsample: bool = _help("Joint training: upsample so every task is equally likely.", True)
    loramoe: LoRAMoEConfig = _help("LoRAMoE settings (trainable: loramoe).", factory=LoRAMoEConfig)
    olora: OLoRAConfig | None = _help("O-LoRA orthogonality loss (LoRA only).", None)
    nlora: NLoRAConfig | None = _help("N-LoRA sparsity loss (LoRA only).", None)
    training: dict[str, Any] = _help("Overrides of the experiment's training settings for this method.", factory=dict)
    diagnostics: bool = _help("After the last round, compare the rounds' weight updates (collision, overlap, "
                              "sparsity; see cairn.eval.diagnostics).", True)
    diagnostics_threshold: float = _help("An update entry is significant if |x| > threshold * max|ΔW| of its module.",
                                         0.01)


@dataclass
class CombineConfig:
    name: str = _help("Label of this combined model; its results go to <output_dir>/<name>.")
    source: str = _help("A method of this experiment with strategy one-round: its round artifacts "
                        "(one model or adapter per task, each trained from the base) are the ingredients.")
    kind: Literal["merge", "moe"] = _help("merge: one model from the ingredients' weights; moe: a mixture "
                                          "of experts built from them.", "merge")
    method: str = _help("merge: linear (average), task_arithmetic, ties, dare, dare_ties.", "ties")
    params: dict[str, Any] = _help("Method parameters: merge: weights, density, lam, sign_method, weight_order, "
                                   "seed; moe: top_k, router_init, normalisation, ...", factory=dict)
    lora_mode: Literal["per_factor", "svd", "full"] = _help(
        "LoRA ingredients: per_factor merges A's and B's separately (PEFT add_weighted_adapter, the seed "
        "paper); svd merges ΔW=B·A and re-factorises; full writes a merged full model.", "per_factor")
    rank: int | None = _help("Rank of the re-factorised adapter (lora_mode: svd).", None)
    router_training: dict[str, Any] | None = _help("moe: train only the routers on the tasks' training data "
                                                   "(training settings overrides; null: no router training).", None)
    router_examples: int = _help("moe: router training examples taken from each task (seeded).", 16)


@dataclass
class OldKnowledgeConfig:
    tasks: list[str] = _help("Old-knowledge suite tasks (see `cairn eval --help`).", factory=lambda: [
        "mmlu", "arc_challenge", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "winogrande"])
    limit: int | None = _help("Questions per task (a seeded subsample; null: all).", 100)
    data_dir: str | None = _help("Folder laid out like the data pack (old_knowledge/<task>/...); "
                                 "null: $CAIRN_DATA, then the Hugging Face hub.", None)
    when: Literal["every", "last", "none"] = _help("After every round, only after the last, or never "
                                                   "(the base is always scored unless 'none').", "every")
    batch_size: int = _help("Batch size of the log-likelihood scorer.", 16)
    num_fewshot: int = _help("Few-shot examples (MMLU takes them from its dev split).", 0)
    seed: int = _help("Seed of the subsample.", 1234)
    precision: Literal["float32", "bf16"] = _help(
        "float32, or bf16: score under bf16 autocast and re-score in float32 the questions bf16 could flip "
        "(float32's predictions at bf16 speed on GPUs with bf16 units).", "float32")


@dataclass
class EvaluationConfig:
    batch_size: int = _help("Prompts per generation batch.", 16)
    old_knowledge: OldKnowledgeConfig | None = _help("The old-knowledge suite (multiple-choice, "
                                                     "lm-evaluation-harness definitions); null: off.", None)


@dataclass
class ExperimentConfig:
    name: str = _help("Experiment name.")
    model: str = _help("Base model: a built-in name, a local Hugging Face folder, or a hub id.")
    tasks: list[TaskConfig] = _help("The curriculum, in round order.")
    methods: list[MethodConfig] = _help("Methods that each run the curriculum from the same base.")
    output_dir: str = _help("Where the experiment directory is written.", "runs")
    data_dir: str | None = _help("Folder that relative task paths are resolved against.", None)
    seed: int = _help("Seed for data order, sampling and initialisation.", 0)
    dtype: Literal["float32", "bfloat16"] = _help("Dtype the model weights are loaded in.", "float32")
    training: TrainingConfig = _help("Training settings shared by all methods.", factory=TrainingConfig)
    evaluation: EvaluationConfig = _help("Evaluation settings.", factory=EvaluationConfig)
    combine: list[CombineConfig] = _help("Combiners run after the methods: merges and mixtures of a "
                                         "one-round method's artifacts, evaluated like a round.", factory=list)

    def training_for(self, method: MethodConfig) -> TrainingConfig:
        """The experiment's training settings with the method's overrides applied (validated)."""
        merged = dataclasses.asdict(self.training) | method.training
        return _build(TrainingConfig, merged, f"methods[{method.name}].training", "<config>")


# ---------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, source)
            except CairnError as exc:
                errors.append(str(exc))
        raise CairnError(f"{source}: {where}: value {value!r} has the wrong type ({' / '.join(_type_name(a) for a in args)})")
    if origin is Literal:
        if value not in args:
            raise CairnError(f"{source}: {where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CairnError(f"{source}: {where}: expected a mapping, got {value!r}")
        return _build(tp, value, where, source)
    if origin is list:
        if not isinstance(value, list):
            raise CairnError(f"{source}: {where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CairnError(f"{source}: {where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise CairnError(f"{source}: {where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, where: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CairnError(
            f"{source}: unknown key {key!r} in {where or 'the top level'}{hint}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CairnError(f"{source}: missing required key {sub!r}: {f.metadata.get('help', '')}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise CairnError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.lr=1e-4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise CairnError(f"--set {text}: {'.'.join(path[: i + 1])} is not a valid list index")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise CairnError(f"--set {text}: {last} is not a valid list index")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise CairnError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CairnError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CairnError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path))


def config_from_dict(data: dict, source: str = "<config>") -> ExperimentConfig:
    cfg = _build(ExperimentConfig, data, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg: ExperimentConfig, source: str) -> None:
    if not cfg.tasks:
        raise CairnError(f"{source}: tasks is empty; list at least one task")
    if not cfg.methods:
        raise CairnError(f"{source}: methods is empty; list at least one method")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise CairnError(f"{source}: task names must be unique, got {names}")
    mnames = [m.name for m in cfg.methods]
    if len(set(mnames)) != len(mnames):
        raise CairnError(f"{source}: method names must be unique, got {mnames}")
    for task in cfg.tasks:
        if task.format != "demo" and not task.metric:
            raise CairnError(f"{source}: task {task.name!r} has no metric; add e.g. `metric: exact_match`")
        if task.format != "demo" and not task.path:
            raise CairnError(f"{source}: task {task.name!r} has no path")
    by_name = {m.name: m for m in cfg.methods}
    for comb in cfg.combine:
        if comb.name in by_name or [c.name for c in cfg.combine].count(comb.name) > 1:
            raise CairnError(f"{source}: combine step name {comb.name!r} is already used; names must be unique")
        src = by_name.get(comb.source)
        if src is None:
            raise CairnError(f"{source}: combine step {comb.name!r}: source {comb.source!r} is not a method of this "
                             f"experiment (methods: {', '.join(by_name)})")
        if src.strategy != "one-round":
            raise CairnError(f"{source}: combine step {comb.name!r}: source method {comb.source!r} must have "
                             f"`strategy: one-round` (each ingredient trained from the base), not {src.strategy!r}")
    for method in cfg.methods:
        cfg.training_for(method)  # validates the overrides
        if method.trainable != "lora" and (method.olora or method.nlora):
            which = "O-LoRA" if method.olora else "N-LoRA"
            raise CairnError(f"{source}: method {method.name!r}: {which} constrains LoRA adapters, not "
                             f"trainable: {method.trainable}; "
                             f"set `trainable: lora` or drop `{'olora' if method.olora else 'nlora'}`")
        if not 0.0 <= method.replay <= 1.0:
            raise CairnError(f"{source}: method {method.name!r}: replay must be in [0, 1], got {method.replay}")
        for label, values in (("olora.lambda1", method.olora and method.olora.lambda1),
                              ("olora.lambda2", method.olora and method.olora.lambda2),
                              ("nlora.lam", method.nlora and method.nlora.lam)):
            vals = values if isinstance(values, list) else [values]
            if any(v is not None and v is not False and v < 0 for v in vals):
                raise CairnError(f"{source}: method {method.name!r}: {label} must be >= 0, got {values}")


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
