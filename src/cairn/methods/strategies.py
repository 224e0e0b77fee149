"""The registered strategies: how a curriculum becomes rounds.

- ``sequential``: one round per task, each from the previous round's model (the seed paper's
  sequential FFT/LoRA, Lee & Wynter 2024, arXiv 2410.13699);
- ``joint``: every task in one round (the fully-cooperative upper reference), optionally upsampled
  so each task is equally likely (:func:`cairn.data.mixing.joint_mix`);
- ``one-round``: each task trained from the base separately (the ingredients of merging and MoE
  mixing); rounds do not form a curriculum.
"""

from __future__ import annotations

from dataclasses import dataclass

from cairn.methods.registry import RoundContext, register_strategy


@dataclass(frozen=True)
class Sequential:
    name: str = "sequential"
    from_base: bool = False
    curriculum: bool = True
    prefix: str = ""

    def plan(self, tasks: list) -> list[tuple[str, list[int]]]:
        return [(f"{self.prefix}{t.name}", [i]) for i, t in enumerate(tasks)]

    def examples(self, ctx: RoundContext) -> tuple[list[dict], dict]:
        return ctx.tasks[ctx.task_ids[0]].train, {}


@dataclass(frozen=True)
class Joint:
    name: str = "joint"
    from_base: bool = False
    curriculum: bool = True

    def plan(self, tasks: list) -> list[tuple[str, list[int]]]:
        return [("joint", list(range(len(tasks))))]

    def examples(self, ctx: RoundContext) -> tuple[list[dict], dict]:
        from cairn.data.mixing import joint_mix

        upsample = ctx.method.joint_upsample
        data = joint_mix([ctx.tasks[i].train for i in ctx.task_ids], upsample=upsample, seed=ctx.seed)
        return data, {"joint": True, "upsample": upsample}


register_strategy(Sequential())
register_strategy(Joint())
register_strategy(Sequential(name="one-round", from_base=True, curriculum=False, prefix="only-"))
