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
import math
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


#: Public name of the field helper, for the config sections the method pieces register.
setting = _help


@dataclass
class TaskConfig:
    name: str = _help("Task name, used in tables and directory names.")
    format: Literal["trace", "jsonl", "messages", "hf", "demo"] = _help(
        "trace: folder with train/eval/test.json lists of {prompt, answer}; jsonl: folder with "
        "train/eval/test.jsonl; messages: folder with train/eval/test.jsonl of {messages: [{role, content}, ...]} "
        "(the last assistant turn is the answer, rendered with the chat template); hf: a Hugging Face dataset "
        "(hub id or a folder saved by `datasets`); demo: a built-in generated domain.",
        "trace",
    )
    path: str | None = _help("Folder (trace/jsonl/messages), dataset id or saved-dataset folder (hf) or demo domain "
                             "name (demo). Relative folders are resolved against the experiment's data_dir.", None)
    metric: str | None = _help("Metric name (see cairn.eval.metrics); shorthand for `metrics: [name]`. "
                               "Required (or `metrics`) except for demo tasks.", None)
    metrics: list[str] = _help("Several metrics, all computed at every evaluation; the first is the task's primary "
                               "score (the results matrix). Do not combine with `metric` unless it is the first.",
                               factory=list)
    prompt_format: Literal["plain", "chat"] | None = _help(
        "plain: the prompt text as is; chat: the tokenizer's chat template around it (user turn = prompt, "
        "generation prompt added, loss on the assistant turn only), in training and evaluation alike. "
        "null: plain, or chat for format: messages.", None)
    system_prompt: str | None = _help("prompt_format: chat: a system turn put before every prompt.", None)
    prompt_field: str = _help("Field holding the prompt (trace/jsonl/hf).", "prompt")
    answer_field: str = _help("Field holding the answer (trace/jsonl/hf).", "answer")
    messages_field: str = _help("Field holding the list of turns (format: messages).", "messages")
    type_field: str | None = _help("Optional per-example field marking world-knowledge examples (LoRAMoE).", None)
    world_knowledge: bool = _help("Whether this task counts as world-knowledge-like (LoRAMoE's constraint).", False)
    train_split: str = _help("Split used for training.", "train")
    test_split: str = _help("Split used for evaluation after each round.", "test")
    split_map: dict[str, str] = _help("Where each split is found in the source: {train: <source split>, test: ...}; "
                                      "a folder's file stem or a dataset's split name (default: the same name).",
                                      factory=dict)
    subset: str | None = _help("hf: the dataset's configuration (subset) name, e.g. 'main' for gsm8k.", None)
    revision: str | None = _help("hf: the dataset's git revision (branch, tag or commit) on the hub.", None)
    train_path: str | None = _help("Training source when it differs from `path` (a folder, or one file of the "
                                   "format; for hf a dataset): e.g. train on MetaMathQA, test on GSM8K.", None)
    test_path: str | None = _help("Test source when it differs from `path` (a folder, one file, or a dataset).", None)
    train_format: Literal["trace", "jsonl", "messages", "hf"] | None = _help(
        "Format of train_path (default: format).", None)
    test_format: Literal["trace", "jsonl", "messages", "hf"] | None = _help(
        "Format of test_path (default: format).", None)
    train_prompt_field: str | None = _help("Prompt field of the training source (default: prompt_field).", None)
    train_answer_field: str | None = _help("Answer field of the training source (default: answer_field).", None)
    test_prompt_field: str | None = _help("Prompt field of the test source (default: prompt_field).", None)
    test_answer_field: str | None = _help("Answer field of the test source (default: answer_field).", None)
    max_train: int | None = _help("Keep at most this many training examples (seeded subsample).", None)
    max_test: int | None = _help("Evaluate on at most this many test examples (seeded subsample).", None)
    max_new_tokens: int | None = _help("Generation budget at evaluation; default from the longest answer.", None)
    max_prompt_tokens: int | None = _help(
        "Evaluation prompts longer than this many tokens keep only their last this-many tokens (left truncation: "
        "the question at the end survives). TRACE's evaluation does this with max_prompt_len (tokenizer "
        "truncation_side left; 512 by default in its inference/infer_single.py, 1024 in its scripts); MeetingBank "
        "and 20Minuten prompts run to thousands of tokens. null: prompts are not cut.", None)
    stop: list[str] = _help("Strings that end a generated answer at evaluation (besides EOS).", factory=list)
    seed: int = _help("Seed of a generated (demo) task.", 0)
    entities: int = _help("Number of invented entities of a generated (demo) task.", 8)

    @property
    def chat(self) -> bool:
        """Chat-formatted: asked for, or one of the task's sources is made of messages."""
        return self.prompt_format == "chat" or "messages" in (self.format, self.train_format, self.test_format)

    @property
    def metric_names(self) -> list[str]:
        """Every metric of the task, the primary first (``metrics``, else ``[metric]``)."""
        return list(self.metrics) if self.metrics else ([self.metric] if self.metric else [])


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
    save_every: int | None = _help("Checkpoint every N optimizer steps for resume (null: no checkpoints, an "
                                   "interrupted round restarts).", None)
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
    packing: bool = _help(
        "Padding-free micro-batches: each micro-batch's examples laid end to end in one row, each attending "
        "only to itself (same loss to float rounding, no work on pads). Used for llama/qwen2/qwen3/mistral "
        "models without sliding windows and methods whose loss parts read weights only (not LoRAMoE); "
        "others train padded, and the run log says why.", True)
    group_by_length: bool = _help(
        "Within each window of 64 micro-batches of the seeded order, put examples of similar length "
        "together (less padding; the examples of each optimizer step are unchanged up to the window).", False)



@dataclass
class MethodConfig:
    name: str = _help("Label of this method; its results go to <output_dir>/<name>.")
    strategy: str = _help(
        "sequential: one round per task, each from the previous round's model; "
        "joint: all tasks at once, one round; one-round: each task trained from the base separately "
        "(the seed paper's one-round models, the ingredients of merging and MoE mixing).",
        "sequential",
    )
    trainable: str = _help(
        "full fine-tuning, lora (PEFT), or loramoe (LoRA experts + router on the MLPs, backbone frozen; "
        "the experts persist and keep training across rounds); see `cairn.methods` for every registered one.",
        "lora")
    replay: float = _help("Fraction of the round's size replayed from each earlier task (0: off).", 0.0)
    joint_upsample: bool = _help("Joint training: upsample so every task is equally likely.", True)
    training: dict[str, Any] = _help("Overrides of the experiment's training settings for this method "
                                     "(validated against `training` when the config loads).", factory=dict)
    diagnostics: bool = _help("After the last round, compare the rounds' weight updates (collision, overlap, "
                              "sparsity; see cairn.eval.diagnostics).", True)
    diagnostics_threshold: float = _help("An update entry is significant if |x| > threshold * max|ΔW| of its module.",
                                         0.01)
    # The sections registered by the method pieces (lora, loramoe, olora, nlora, ewc, ...), by key. In
    # YAML they are keys of the method itself (`olora: {lambda1: 0.5}`); see cairn.methods.registry.
    sections: dict[str, Any] = field(default_factory=dict, metadata={"section_holder": True})

    def __getattr__(self, key: str) -> Any:
        # `method.olora` reads a registered section (None when the part is off).
        sections = self.__dict__.get("sections")
        if sections is not None and not key.startswith("_"):
            from cairn.methods.registry import sections as registered

            if key in sections:
                return sections[key]
            if key in registered():
                return None
        raise AttributeError(key)


@dataclass
class MergeParams:
    """``params`` of a merge step (the fields of :class:`cairn.combine.merge_fns.MergeSpec`)."""

    weights: list[float] | None = _help("One weight per ingredient (null: equal weights).", None)
    density: float | None = _help("Fraction of each task vector kept (TIES, DARE).", None)
    lam: float | None = _help("Scale of the merged task vector.", None)
    sign_method: Literal["total", "frequency"] | None = _help("TIES sign election rule.", None)
    weight_order: Literal["paper", "mergekit"] | None = _help("Whether weights apply before or after "
                                                              "TIES's sign election.", None)
    seed: int | None = _help("Seed of DARE's random drop.", None)


@dataclass
class MoEParams:
    """``params`` of a moe step; null leaves the builder's default (FFT and LoRA experts differ)."""

    top_k: int | None = _help("Experts per token (FFT default 2; LoRA default: dense).", None)
    router_init: Literal["random", "prompts", "last_token", "data", "zero"] | None = _help(
        "Router initialisation (FFT default prompts; LoRA default random).", None)
    normalisation: Literal["softmax", "sigmoid"] | None = _help("LoRA experts: routing normalisation.", None)
    moe_layers: list[int] | None = _help("FFT experts: decoder layers that become MoE layers (null: all).", None)
    same_base_threshold: float | None = _help("FFT experts: largest relative distance to the base that "
                                              "still counts as the same base.", None)
    check_base_name: bool | None = _help("LoRA experts: require the adapters to name the same base.", None)
    aux_loss_coef: float = _help("Weight of the router load-balancing loss in router training.", 0.01)

    def builder_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "aux_loss_coef"}


@dataclass
class CombineConfig:
    name: str = _help("Label of this combined model; its results go to <output_dir>/<name>.")
    source: str = _help("A method of this experiment with strategy one-round: its round artifacts "
                        "(one model or adapter per task, each trained from the base) are the ingredients.")
    kind: Literal["merge", "moe"] = _help("merge: one model from the ingredients' weights; moe: a mixture "
                                          "of experts built from them.", "merge")
    method: str = _help("merge: linear (average), task_arithmetic, ties, dare, dare_ties.", "ties")
    params: dict[str, Any] = _help("Parameters, checked when the config loads: merge: weights, density, lam, "
                                   "sign_method, weight_order, seed (MergeParams); moe: top_k, router_init, "
                                   "normalisation, moe_layers, same_base_threshold, check_base_name, "
                                   "aux_loss_coef (MoEParams).", factory=dict)
    # [paper helper, issue 11] default per_factor -> full (mean ΔW merged into the base, the seed code's average)
    lora_mode: Literal["per_factor", "svd", "full"] = _help(
        "LoRA ingredients: full merges the updates ΔW=B·A into the base and writes a full model (the default; "
        "with 'linear' that is base + mean ΔW, the seed code's averaging); per_factor merges A's and B's "
        "separately, PEFT add_weighted_adapter's behaviour (B·A of the merge is not the mean ΔW); svd merges "
        "ΔW and re-factorises to an adapter.", "full")
    rank: int | None = _help("Rank of the re-factorised adapter (lora_mode: svd).", None)
    router_training: dict[str, Any] | None = _help("moe: train only the routers on examples of each task's eval "
                                                   "split (its train split when it has none); training settings "
                                                   "overrides, checked at load; null: no router training.", None)
    router_examples: int = _help("moe: router training examples taken from each task (seeded).", 16)

    def typed_params(self, source: str = "<config>") -> MergeParams | MoEParams:
        """``params`` as the dataclass of this step's kind; an unknown key names the key and the file."""
        cls = MergeParams if self.kind == "merge" else MoEParams
        return _build(cls, self.params, f"combine[{self.name}].params", source)


@dataclass
class OldKnowledgeConfig:
    tasks: list[str] = _help("Old-knowledge suite tasks (see `cairn eval --help`).", factory=lambda: [
        "mmlu", "arc_challenge", "commonsense_qa", "hellaswag", "openbookqa", "piqa", "winogrande"])
    limit: int | None = _help("Questions per task (a seeded subsample; null: all).", 100)
    data_dir: str | None = _help("Folder laid out like the data pack (old_knowledge/<task>/...); "
                                 "null: $CAIRN_DATA, then the experiment's data_dir when it holds "
                                 "old_knowledge/, then the Hugging Face hub.", None)
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
    batch_size: int = _help("Rows decoded at once in generation (continuous batching: a finished row's slot takes "
                            "the next prompt). A decode step costs little more at 16 than at 8 (weight reads "
                            "dominate), so a larger batch is nearly free until memory runs short.", 16)
    old_knowledge: OldKnowledgeConfig | None = _help("The old-knowledge suite (multiple-choice, "
                                                     "lm-evaluation-harness definitions); null: off.", None)


# --- ux: tracking section (issue 15) ---
@dataclass
class TrackingConfig:
    report_to: list[str] = _help("Experiment trackers through Accelerate: tensorboard, mlflow, wandb, trackio "
                                 "(pip install 'cairn-lm[tracking]'); one tracker run per method and seed.",
                                 factory=list)
    log_dir: str | None = _help("Where trackers write (TensorBoard event files, MLflow's local store "
                                "<log_dir>/mlruns); null: <experiment directory>/tracking.", None)
# --- end ux ---


# --- storage section (issue 12, item 5: disk) ---
@dataclass
class StorageConfig:
    fft_format: Literal["full", "delta"] = _help(
        "How a full-fine-tuning round's weights are stored: full (model.safetensors, a folder transformers "
        "loads) or delta (model.delta: a bit-exact compressed XOR against the previous round or the base; "
        "resume, `cairn eval`/`cairn export` of the round, the update diagnostics, combine steps and "
        "`cairn ledger import` restore it by walking its parent chain; about 2x smaller).", "delta")
    keep_models: Literal["all", "last", "needed"] = _help(
        "Which full-fine-tuning round models stay on disk: all; last (the latest round only; the earlier go "
        "once a later one is saved); needed (every round until the method ends, then the last). round.json "
        "stays, so a rerun does not retrain a removed round. Combine ingredients are kept. With fft_format: "
        "delta a kept round whose parent is removed is first re-stored as a delta against the nearest kept "
        "round or the base.", "all")
    bf16_copy: bool = _help("Also save a bf16 copy of each full-fine-tuning round (model-bf16/), with its "
                            "rounding error relative to the round's update in the log.", False)
# --- end storage ---


@dataclass
class ExperimentConfig:
    name: str = _help("Experiment name.")
    model: str = _help("Base model: a built-in name, a local Hugging Face folder, or a hub id.")
    tasks: list[TaskConfig] = _help("The curriculum, in round order.")
    methods: list[MethodConfig] = _help("Methods that each run the curriculum from the same base.")
    output_dir: str = _help("Where the experiment directory is written.", "runs")
    data_dir: str | None = _help("Folder that relative task paths are resolved against.", None)
    seed: int = _help("Seed for data order, sampling and initialisation.", 0)
    # [wire helper, issue 11] several seeds: each method and combine step once per seed
    seeds: list[int] | None = _help("Run every method and combine step once per seed, into <method>/seed-<s>/ "
                                    "(training seed and data order; tasks' subsamples and test sets stay fixed, "
                                    "seeded by `seed`); null: one run with `seed`, into <method>/.", None)
    dtype: Literal["float32", "bfloat16"] = _help("Dtype the model weights are loaded in.", "float32")
    training: TrainingConfig = _help("Training settings shared by all methods.", factory=TrainingConfig)
    evaluation: EvaluationConfig = _help("Evaluation settings.", factory=EvaluationConfig)
    combine: list[CombineConfig] = _help("Combiners run after the methods: merges and mixtures of a "
                                         "one-round method's artifacts, evaluated like a round.", factory=list)
    tracking: TrackingConfig = _help("Experiment tracking (loss curves, scores).", factory=TrackingConfig)  # ux
    storage: StorageConfig = _help("How round models are stored on disk.", factory=StorageConfig)

    def training_for(self, method: MethodConfig, source: str = "the config") -> TrainingConfig:
        """The experiment's training settings with the method's overrides applied (validated)."""
        return self.training_with(method.training, f"methods[{method.name}].training", source)

    def training_with(self, overrides: dict[str, Any], where: str, source: str = "<config>") -> TrainingConfig:
        """The experiment's training settings with ``overrides`` (a method's or a router training's), range-checked."""
        tcfg = _build(TrainingConfig, dataclasses.asdict(self.training) | overrides, where, source)
        _check_training(tcfg, where, source)
        return tcfg


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
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message names the inner key at fault
            return _convert(real[0], value, where, source)
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


def _method_sections() -> dict:
    # Plugin discovery: the method pieces register their config sections when cairn.methods is
    # imported (the one place config looks up a layer; it only reads the registered dataclasses).
    from cairn.methods.registry import sections

    return {k: s for k, s in sections().items() if s.cls is not None}


def _build_method(data: dict, where: str, source: str) -> MethodConfig:
    """A MethodConfig: its own keys, plus the registered sections (``lora:``, ``olora:``, ``ewc:``, ...)."""
    from cairn.methods.registry import strategies, trainables

    registered = _method_sections()
    own = {k: v for k, v in data.items() if k not in registered}
    cfg = _build(MethodConfig, own, where, source, extra=list(registered))
    for key, options in (("strategy", strategies()), ("trainable", trainables())):
        if getattr(cfg, key) not in options:
            raise CairnError(f"{source}: {where}.{key}: {getattr(cfg, key)!r} is not one of "
                             f"{', '.join(map(repr, options))}")
    for key, section in registered.items():
        value = data.get(key)
        if value is None:
            cfg.sections[key] = section.cls() if section.default_on else None
        else:
            cfg.sections[key] = _convert(section.cls, value, f"{where}.{key}", source)
    return cfg


def _build(cls: type, data: dict, where: str, source: str, extra: list[str] | None = None):
    if cls is MethodConfig and extra is None:
        return _build_method(data, where, source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("section_holder")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        valid = list(fields) + list(extra or [])
        close = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CairnError(
            f"{source}: unknown key {key!r} in {where or 'the top level'}{hint}; "
            f"valid keys: {', '.join(valid)}"
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
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise CairnError(f"--set {text}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                         "quote it or fix the brackets") from None
    return key.strip().split("."), value


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
    if path.is_dir():
        raise CairnError(f"config file {path} is a directory; pass an experiment YAML file")
    if not path.is_file():
        raise CairnError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CairnError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                         "save the config as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CairnError(f"{path}: not valid YAML{where}: {problem}") from None
    except OSError as exc:
        raise CairnError(f"cannot read config file {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise CairnError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    overrides = overrides or []
    merged = apply_overrides(data, overrides)
    try:
        return config_from_dict(merged, str(path))
    except CairnError:
        if not overrides or not _valid(data, str(path)):
            raise
    # The file is fine on its own: the --set values are to blame, so the message names them.
    return config_from_dict(merged, "--set " + " --set ".join(overrides))


def _valid(data: dict, source: str) -> bool:
    try:
        config_from_dict(data, source)
    except CairnError:
        return False
    return True


def config_from_dict(data: dict, source: str = "the config") -> ExperimentConfig:
    cfg = _build(ExperimentConfig, data, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg: ExperimentConfig, source: str) -> None:
    if cfg.seeds is not None:  # [wire helper, issue 11]
        if not cfg.seeds:
            raise CairnError(f"{source}: seeds is empty; list at least one seed (e.g. seeds: [0, 1, 2]) or remove "
                             f"the key to run once with `seed`")
        repeated = sorted({s for s in cfg.seeds if cfg.seeds.count(s) > 1})
        if repeated:
            raise CairnError(f"{source}: seeds lists {', '.join(map(str, repeated))} more than once ({cfg.seeds}); "
                             f"each seed must be distinct")
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
        validate_task(task, source)
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
    from cairn.tracking import check_trackers  # ux: unknown tracker / missing package

    check_trackers(cfg.tracking.report_to, f"{source}: tracking.report_to")
    _check_ranges(cfg, source)
    for method in cfg.methods:
        cfg.training_for(method, source)  # validates the overrides
        if not 0.0 <= method.replay <= 1.0:
            raise CairnError(f"{source}: method {method.name!r}: replay must be in [0, 1], got {method.replay}")
        for key, section in _method_sections().items():
            value = method.sections.get(key)
            if value is not None and section.check is not None:
                section.check(method, value, source)
    for comb in cfg.combine:
        comb.typed_params(source)
        if comb.router_training is not None:
            cfg.training_with(comb.router_training, f"combine[{comb.name}].router_training", source)


def method_to_dict(method: MethodConfig) -> dict:
    """A method as its YAML mapping: the registered sections are keys of the method itself."""
    data = {f.name: copy.deepcopy(getattr(method, f.name)) for f in dataclasses.fields(method)
            if not f.metadata.get("section_holder")}
    for key, value in method.sections.items():
        data[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return data


def to_dict(cfg: ExperimentConfig) -> dict:
    data = dataclasses.asdict(cfg)
    data["methods"] = [method_to_dict(m) for m in cfg.methods]
    return data


def validate_task(task: TaskConfig, source: str | None = None) -> None:
    """The task's keys agree with each other (its data is checked when the task loads)."""
    where = f"{source}: task {task.name!r}" if source else f"task {task.name!r}"
    if task.format != "demo" and not task.metric_names:
        raise CairnError(f"{where} has no metric; add e.g. `metric: exact_match` (or `metrics: [a, b]`)")
    if task.metric and task.metrics and task.metrics[0] != task.metric:
        raise CairnError(f"{where}: `metric: {task.metric}` and `metrics: {task.metrics}` disagree on the primary "
                         f"metric; keep only `metrics` (its first entry is the primary score)")
    if len(set(task.metrics)) != len(task.metrics):
        raise CairnError(f"{where}: `metrics` lists a metric twice: {task.metrics}")
    if task.format != "demo" and not task.path and not (task.train_path and task.test_path):
        raise CairnError(f"{where} has no path; set `path` (or both `train_path` and `test_path`)")
    if "messages" in (task.format, task.train_format, task.test_format) and task.prompt_format == "plain":
        raise CairnError(f"{where}: format: messages is rendered with the chat template; "
                         f"drop `prompt_format: plain` (or set it to chat)")
    if task.system_prompt is not None and not task.chat:
        raise CairnError(f"{where}: system_prompt needs `prompt_format: chat`")
    if task.format == "demo" and (task.train_path or task.test_path):
        raise CairnError(f"{where}: a demo task is generated; train_path/test_path do not apply")
    unknown = [k for k in task.split_map if k not in {task.train_split, task.test_split, "train", "test", "eval",
                                                        "validation"}]
    if unknown:
        raise CairnError(f"{where}: split_map key {unknown[0]!r} is not one of the task's splits "
                         f"({task.train_split}, {task.test_split}, eval, validation)")


# ---------------------------------------------------------------------------------------------
# Value ranges: a value of the right type can still be meaningless (a batch of 0, a negative step
# count); catching it here fails the run before any model loads or any file is written.


def _need(ok: bool, source: str, where: str, value: Any, rule: str) -> None:
    if not ok:
        raise CairnError(f"{source}: {where} must be {rule}, got {value!r}")


def _positive_int(source: str, where: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    _need(isinstance(value, int) and value >= 1, source, where, value, "an integer >= 1" + (" or null" if optional else ""))


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_training(t: TrainingConfig, where: str, source: str) -> None:
    _need(_finite(t.epochs) and t.epochs > 0, source, f"{where}.epochs", t.epochs, "> 0")
    _positive_int(source, f"{where}.max_steps", t.max_steps, optional=True)
    _need(_finite(t.lr) and t.lr > 0, source, f"{where}.lr", t.lr, "a finite number > 0 (e.g. 1e-4)")
    _need(_finite(t.weight_decay) and t.weight_decay >= 0, source, f"{where}.weight_decay", t.weight_decay, ">= 0")
    _positive_int(source, f"{where}.batch_size", t.batch_size)
    _positive_int(source, f"{where}.grad_accum", t.grad_accum)
    _need(_finite(t.warmup_ratio) and 0 <= t.warmup_ratio <= 1, source, f"{where}.warmup_ratio", t.warmup_ratio,
          "in [0, 1]")
    _need(isinstance(t.max_length, int) and t.max_length >= 2, source, f"{where}.max_length", t.max_length,
          "an integer >= 2 (a prompt token and an answer token)")
    if t.max_grad_norm is not None:
        _need(_finite(t.max_grad_norm) and t.max_grad_norm > 0, source, f"{where}.max_grad_norm", t.max_grad_norm,
              "> 0 or null (off)")
    _positive_int(source, f"{where}.log_every", t.log_every)
    _positive_int(source, f"{where}.save_every", t.save_every, optional=True)


def _check_ranges(cfg: ExperimentConfig, source: str) -> None:
    _need(bool(cfg.name.strip()) and "/" not in cfg.name and cfg.name not in (".", ".."), source, "name", cfg.name,
          "a non-empty name usable as a directory name")
    _check_training(cfg.training, "training", source)
    for i, task in enumerate(cfg.tasks):
        w = f"tasks[{i}] ({task.name})"
        _need(bool(task.name.strip()) and "/" not in task.name, source, f"{w}.name", task.name,
              "a non-empty name without '/'")
        for key in ("max_train", "max_test", "max_new_tokens", "max_prompt_tokens"):
            _positive_int(source, f"{w}.{key}", getattr(task, key), optional=True)
        _positive_int(source, f"{w}.entities", task.entities)
    for m in cfg.methods:
        w = f"methods[{m.name}]"
        _need(bool(m.name.strip()) and "/" not in m.name and m.name not in ("base", "report", ".", ".."), source,
              f"{w}.name", m.name, "a non-empty name usable as a directory (not 'base' or 'report')")
        _need(_finite(m.replay), source, f"{w}.replay", m.replay, "in [0, 1]")
        if m.trainable == "lora":
            _positive_int(source, f"{w}.lora.r", m.lora.r)
            _need(_finite(m.lora.alpha) and m.lora.alpha > 0, source, f"{w}.lora.alpha", m.lora.alpha, "> 0")
            _need(_finite(m.lora.dropout) and 0 <= m.lora.dropout < 1, source, f"{w}.lora.dropout", m.lora.dropout,
                  "in [0, 1)")
            _need(bool(m.lora.target_modules), source, f"{w}.lora.target_modules", m.lora.target_modules,
                  "a non-empty list of module names or 'all-linear'")
        if m.trainable == "loramoe":
            e = m.loramoe
            _positive_int(source, f"{w}.loramoe.experts", e.experts)
            _positive_int(source, f"{w}.loramoe.rank", e.rank)
            _need(_finite(e.alpha) and e.alpha > 0, source, f"{w}.loramoe.alpha", e.alpha, "> 0")
            _need(_finite(e.dropout) and 0 <= e.dropout < 1, source, f"{w}.loramoe.dropout", e.dropout, "in [0, 1)")
            if e.top_k is not None:
                _need(isinstance(e.top_k, int) and 1 <= e.top_k <= e.experts, source, f"{w}.loramoe.top_k", e.top_k,
                      f"between 1 and experts ({e.experts}) or null")
            _need(_finite(e.beta) and e.beta >= 0, source, f"{w}.loramoe.beta", e.beta, ">= 0")
            _need(_finite(e.delta) and 0 <= e.delta < 1, source, f"{w}.loramoe.delta", e.delta, "in [0, 1)")
    for c in cfg.combine:
        _positive_int(source, f"combine[{c.name}].router_examples", c.router_examples)
        _positive_int(source, f"combine[{c.name}].rank", c.rank, optional=True)
    _positive_int(source, "evaluation.batch_size", cfg.evaluation.batch_size)
    ok = cfg.evaluation.old_knowledge
    if ok is not None:
        from cairn.eval.suites import resolve_tasks  # stdlib-only import: names are checked before any model loads

        _need(bool(ok.tasks), source, "evaluation.old_knowledge.tasks", ok.tasks, "a non-empty list of tasks")
        try:
            resolve_tasks(ok.tasks)
        except CairnError as exc:
            raise CairnError(f"{source}: evaluation.old_knowledge.tasks: {exc}") from None
        _positive_int(source, "evaluation.old_knowledge.limit", ok.limit, optional=True)
        _positive_int(source, "evaluation.old_knowledge.batch_size", ok.batch_size)
        _need(isinstance(ok.num_fewshot, int) and ok.num_fewshot >= 0, source, "evaluation.old_knowledge.num_fewshot",
              ok.num_fewshot, "an integer >= 0")


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
