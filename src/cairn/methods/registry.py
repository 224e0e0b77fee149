"""The method seam: what a method is made of, and the registries that name the pieces.

A configured method (one entry of ``methods:``) is composed of three kinds of registered pieces:

- a **trainable** (``trainable:``; ``full``, ``lora``, ``loramoe``, ...): which parameters train in a
  round, how the round's artifact is saved and restored, and what it hands to combiners;
- a **strategy** (``strategy:``; ``sequential``, ``joint``, ``one-round``): the rounds (labels and
  tasks) and whether each round starts from the base or from the previous round;
- **parts** (``replay``, ``olora``, ``nlora``, ``ewc``, ...): each reads its own config section and
  may change the round's examples, add loss parts (``extra_loss(model, batch, outputs)``) and keep
  state after the round (O-LoRA's A store, EWC's Fisher).

Each piece lives in its own module under :mod:`cairn.methods` and registers itself on import;
:func:`discover` imports every module of the package once, so a new method is one new file. A piece
may also register a config section (a dataclass); the config loader validates it like any other
section, so a typo fails when the config loads. The runner (:mod:`cairn.experiment`) only calls
:func:`compose` and the :class:`Method` it returns; it names no method.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from cairn.errors import CairnError


@dataclass
class RoundContext:
    """Everything a piece may need about the round being trained (k is 1-based)."""

    cfg: Any  # ExperimentConfig
    method: Any  # MethodConfig
    k: int
    label: str
    task_ids: list[int]
    rdir: Path  # this round's directory
    mdir: Any  # cairn.rundir.MethodDir
    tasks: list  # every cairn.data.tasks.Task of the curriculum
    tokenizer: Any
    load_base: Callable[[], Any]
    log: Callable[[str], None]
    # Whether this process writes run files (only the main process of a multi-process run does; the
    # others compute the same model and wait at a barrier before reading what it wrote).
    write: bool = True

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def round_dir(self, k: int) -> Path:
        """Round ``k``'s directory in this method's plan (the label comes from the plan)."""
        return self.mdir.round(k, self.plan[k - 1][0])

    plan: list = dataclasses.field(default_factory=list)


class Trainable(Protocol):
    name: str
    #: True when the same parameters train in every round (a penalty on their drift makes sense).
    persistent_params: bool
    #: What combiners receive from a one-round run: "model" (a transformers folder) or "adapter" (PEFT).
    ingredient_kind: str | None

    def prepare(self, model, ctx: RoundContext): ...  # returns the model with this round's params trainable
    def loss_parts(self) -> list: ...  # loss parts the trainable itself needs (LoRAMoE's balancing)
    def save(self, model, ctx: RoundContext): ...  # writes the artifact; returns the next round's (frozen) start
    def restore(self, ctx: RoundContext, upto: int): ...  # the model after round ``upto`` (>= 1)
    def ingredient(self, rdir: Path, k: int) -> Path: ...
    # (ΔW per round, A factors per round or None, nuclear-norm fn for large models or None), or None
    def updates(self, ctx: RoundContext, rdirs: list[Path]) -> tuple | None: ...


class Strategy(Protocol):
    name: str
    from_base: bool  # every round starts from the base model (one-round models)
    curriculum: bool  # rounds follow each other (the results matrix has a curriculum)

    def plan(self, tasks: list) -> list[tuple[str, list[int]]]: ...
    def examples(self, ctx: RoundContext) -> tuple[list[dict], dict]: ...


class Part(Protocol):
    key: str  # its config section

    def examples(self, examples: list[dict], record: dict, ctx: RoundContext) -> tuple[list[dict], dict]: ...
    def loss_parts(self, model, ctx: RoundContext) -> list: ...
    def after_round(self, model, ctx: RoundContext) -> None: ...  # before the artifact is saved


class PartBase:
    """Default hooks for a part: it changes nothing unless it overrides a hook."""

    key = ""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def examples(self, examples, record, ctx):
        return examples, record

    def loss_parts(self, model, ctx):
        return []

    def after_round(self, model, ctx) -> None:
        return None


@dataclass(frozen=True)
class Section:
    """A config section of a method: ``key: {...}`` built as ``cls``.

    ``default_on``: the section exists with defaults when the config omits it (a trainable's settings);
    otherwise it is None when omitted and its presence switches the part on.
    ``check(method, section, source)`` validates it against the rest of the method at load.
    ``active(method)`` says whether the part takes part in a method (default: its section is set).
    """

    key: str
    cls: type | None
    default_on: bool = False
    check: Callable[[Any, Any, str], None] | None = None
    part: Callable[[Any], Any] | None = None  # settings -> Part
    active: Callable[[Any], bool] | None = None


_TRAINABLES: dict[str, Callable[[Any], Trainable]] = {}
_STRATEGIES: dict[str, Strategy] = {}
_SECTIONS: dict[str, Section] = {}
_discovered = False


def register_trainable(name: str, factory: Callable[[Any], Trainable]) -> None:
    """``factory(method_config) -> Trainable``."""
    _TRAINABLES[name] = factory


def register_strategy(strategy: Strategy) -> None:
    _STRATEGIES[strategy.name] = strategy


def register_section(section: Section) -> None:
    _SECTIONS[section.key] = section


def discover() -> None:
    """Import every module of :mod:`cairn.methods` once, so each registers its pieces."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import cairn.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def trainables() -> list[str]:
    discover()
    return sorted(_TRAINABLES)


def strategies() -> list[str]:
    discover()
    return sorted(_STRATEGIES)


def sections() -> dict[str, Section]:
    discover()
    return dict(_SECTIONS)


def parts() -> list[str]:
    """The config keys of the registered parts (sections that add behaviour to any trainable)."""
    return sorted(k for k, s in sections().items() if s.part is not None)


@dataclass
class Method:
    """One configured method: a trainable, a strategy and the active parts, in config order."""

    name: str
    trainable: Trainable
    strategy: Strategy
    parts: list

    def plan(self, tasks: list) -> list[tuple[str, list[int]]]:
        return self.strategy.plan(tasks)

    def round_examples(self, ctx: RoundContext) -> tuple[list[dict], dict]:
        examples, record = self.strategy.examples(ctx)
        for part in self.parts:
            examples, record = part.examples(examples, record, ctx)
        return examples, record

    def prepare(self, model, ctx: RoundContext):
        return self.trainable.prepare(model, ctx)

    def loss_parts(self, model, ctx: RoundContext) -> list:
        return self.trainable.loss_parts() + [lp for part in self.parts for lp in part.loss_parts(model, ctx)]

    def finish_round(self, model, ctx: RoundContext):
        """Let the parts keep their state, then save the artifact; returns the next round's start."""
        for part in self.parts:
            part.after_round(model, ctx)
        model = self.trainable.save(model, ctx)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def restore(self, ctx: RoundContext, upto: int):
        model = ctx.load_base() if upto == 0 else self.trainable.restore(ctx, upto)
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def compose(method_cfg) -> Method:
    """The :class:`Method` a config entry describes (names were validated when the config loaded)."""
    discover()
    if method_cfg.trainable not in _TRAINABLES:
        raise CairnError(f"method {method_cfg.name!r}: unknown trainable {method_cfg.trainable!r}; "
                         f"registered: {', '.join(sorted(_TRAINABLES))}")
    if method_cfg.strategy not in _STRATEGIES:
        raise CairnError(f"method {method_cfg.name!r}: unknown strategy {method_cfg.strategy!r}; "
                         f"registered: {', '.join(sorted(_STRATEGIES))}")
    active = []
    for key, section in _SECTIONS.items():
        if section.part is None:
            continue
        settings = method_cfg.sections.get(key)
        on = section.active(method_cfg) if section.active else settings is not None
        if on:
            active.append(section.part(settings if settings is not None else method_cfg))
    return Method(method_cfg.name, _TRAINABLES[method_cfg.trainable](method_cfg),
                  _STRATEGIES[method_cfg.strategy], active)


def freeze(model):
    """Every parameter frozen; the one place a round's start (or an evaluated model) is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_persists(name: str) -> bool:
    """Whether trainable ``name`` trains the same parameters every round (see Trainable.persistent_params)."""
    discover()
    factory = _TRAINABLES.get(name)
    return bool(getattr(factory, "persistent_params", False))
