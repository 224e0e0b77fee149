"""The project's training method: how ``cairn contribute --data`` trains a round from the parent release.

A project keeps one method in its ledger (``meta.method``), written in the experiment's method form
(:class:`cairn.config.MethodConfig` as YAML: ``trainable``, ``lora``, the parts ``olora``, ``nlora``,
``replay``) plus ``training`` (every :class:`cairn.config.TrainingConfig` setting) and ``seed``. It is
built and checked by the experiment's own config code (:func:`cairn.config._build`, the registered
sections' checks), so a typo or O-LoRA on full fine-tuning fails as it would in a config file.

What a contribution round supports, from the seed paper's fully cooperative setting (Lee & Wynter
2024, arXiv 2410.13699): strategy ``sequential`` (each contribution one round from its parent),
trainable ``lora`` (merged into the weights: ``lora.sequential: merge``) or ``full``, and the parts
``olora`` (Wang et al. 2023), ``nlora`` (Yang et al. 2024) and ``replay`` (from earlier contributions'
stored data, so the policy must have ``keep_data: true``).

Named shortcuts (``cairn init --method NAME``, or ``method: NAME`` in the policy file): ``lora``,
``full``, ``olora`` (lora + ``olora: {}``), ``nlora`` (lora + ``nlora: {}``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from cairn.errors import CairnError

#: Named methods and the mapping each stands for.
NAMED = {"lora": {"trainable": "lora"}, "full": {"trainable": "full"},
         "olora": {"trainable": "lora", "olora": {}}, "nlora": {"trainable": "lora", "nlora": {}}}
TRAINABLES = ("lora", "full")
PARTS = ("olora", "nlora", "replay")
#: Keys of the method mapping that are not MethodConfig's own (the ledger keeps them beside it).
OWN_KEYS = ("training", "seed")


@dataclass
class ProjectMethod:
    """A project's method, built: the method config the registry composes, training settings, seed."""

    config: Any  # cairn.config.MethodConfig
    training: Any  # cairn.config.TrainingConfig
    seed: int

    @property
    def parts(self) -> list[str]:
        """The active parts, by key (``olora``, ``nlora``, ``replay``)."""
        from cairn.methods.registry import compose

        return [p.key for p in compose(self.config).parts]


def _defaults(trainable: str) -> dict:
    from cairn.config import TrainingConfig
    from cairn.methods.lora import LoraConfig

    return {"strategy": "sequential", "trainable": trainable, "lora": dataclasses.asdict(LoraConfig()),
            "training": dataclasses.asdict(TrainingConfig())}


def method_spec(given: str | dict | None, overrides: list[str], where: str) -> dict:
    """The method mapping to store: a name or a mapping (``None``: lora), defaults filled, ``--set`` applied.

    Defaults are filled in full (every LoRA and training setting), so the ledger records what ran.
    """
    from cairn.config import apply_overrides

    if given is None:
        given = "lora"
    if isinstance(given, str):
        if given not in NAMED:
            raise CairnError(f"{where}: unknown method {given!r}; known: {', '.join(NAMED)} (sequential rounds; "
                             "add `replay: F` with `keep_data: true` for replay), or a mapping in the experiment's "
                             "method form, e.g. {trainable: lora, olora: {lambda1: 0.5}}")
        given = NAMED[given]
    if not isinstance(given, dict):
        raise CairnError(f"{where}: method must be a name ({', '.join(NAMED)}) or a mapping, got {given!r}")
    given = copy.deepcopy(given)
    trainable = given.get("trainable", "lora")
    spec = _defaults(trainable if isinstance(trainable, str) else "lora")
    for key, value in given.items():
        if key in ("lora", "training") and isinstance(value, dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return apply_overrides(spec, overrides)


def build_method(spec: dict, where: str, keep_data: bool) -> ProjectMethod:
    """Check a method mapping against what a contribution round supports; returns it built.

    ``keep_data``: the project's policy; replay needs earlier contributions' data to be stored.
    """
    from cairn.config import MethodConfig, TrainingConfig, _build, _method_sections

    if not isinstance(spec, dict):
        raise CairnError(f"{where}: the project's method must be a mapping, got {spec!r}")
    own = {k: v for k, v in spec.items() if k not in OWN_KEYS}
    own.setdefault("name", "project")
    cfg = _build(MethodConfig, own, "method", where)  # unknown keys, names of trainables and strategies
    if cfg.strategy != "sequential":
        raise CairnError(f"{where}: method.strategy {cfg.strategy!r}: a contribution is one round from its parent "
                         "release; use strategy: sequential (joint training and one-round models are runs: "
                         "`cairn run`, then `cairn ledger import`)")
    if cfg.trainable not in TRAINABLES:
        raise CairnError(f"{where}: method.trainable {cfg.trainable!r} is not supported for contributions; use "
                         f"{' or '.join(TRAINABLES)} (a round's artifact must be a PEFT adapter or a full model)")
    if cfg.trainable == "lora" and cfg.sections["lora"].sequential != "merge":
        raise CairnError(f"{where}: method.lora.sequential {cfg.sections['lora'].sequential!r}: releases merge each "
                         "adapter into the weights; use sequential: merge")
    for key, section in _method_sections().items():  # the sections' own checks (O-LoRA needs LoRA, lambdas)
        value = cfg.sections.get(key)
        if value is not None and section.check is not None:
            section.check(cfg, value, where)
    if not 0.0 <= cfg.replay <= 1.0:
        raise CairnError(f"{where}: method.replay must be a fraction in [0, 1], got {cfg.replay}")
    method = ProjectMethod(cfg, _build(TrainingConfig, spec.get("training") or {}, "method.training", where),
                           _seed(spec.get("seed", 0), where))
    unsupported = [p for p in method.parts if p not in PARTS]
    if unsupported:
        raise CairnError(f"{where}: method part(s) {', '.join(unsupported)} are not supported for contributions; "
                         f"supported: {', '.join(PARTS)}")
    if cfg.replay > 0 and not keep_data:
        raise CairnError(f"{where}: method.replay {cfg.replay:g} replays earlier contributions' training data, but "
                         "the project does not keep data; add `keep_data: true` to the policy (cairn init "
                         "--keep-data) or drop replay")
    return method


def _seed(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CairnError(f"{where}: method.seed must be an integer, got {value!r}")
    return value


def project_method(project) -> ProjectMethod:
    """The method recorded in ``project``'s ledger, checked (a hand-edited ledger fails here, before training)."""
    return build_method(project.method, f"project {project.path} (method)", project.policy.keep_data)


def stored_spec(method: ProjectMethod) -> dict:
    """The method mapping the ledger keeps: the active pieces with every setting filled in."""
    from cairn.config import method_to_dict

    data = method_to_dict(method.config)
    keep = {"strategy", "trainable", "replay", *method.parts}
    if method.config.trainable == "lora":
        keep.add("lora")
    out = {k: v for k, v in data.items() if k in keep and v is not None}
    out["training"] = dataclasses.asdict(method.training)
    out["seed"] = method.seed
    return out


def method_record(method: ProjectMethod) -> dict:
    """The method and its settings as the ledger records them for a contribution (and its active parts)."""
    return stored_spec(method) | {"parts": method.parts}
