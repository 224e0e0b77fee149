"""Replay (fully-cooperative): each round also trains on a fraction of every earlier task's data.

``replay: f`` mixes f × (the round's size) examples of each earlier task into round t's data, seeded
per round (:func:`cairn.data.mixing.replay_mix`); which examples were replayed is recorded in the
round's ``round_data.json``. The seed paper's replay baseline (Lee & Wynter 2024, arXiv 2410.13699).
"""

from __future__ import annotations

from cairn.methods.registry import PartBase, RoundContext, Section, register_section


class Replay(PartBase):
    key = "replay"

    def examples(self, examples: list[dict], record: dict, ctx: RoundContext):
        first = ctx.task_ids[0]
        if len(ctx.task_ids) > 1 or first == 0:  # joint rounds see every task; round 1 has no past
            return examples, record
        from cairn.data.mixing import replay_mix

        earlier = [ctx.tasks[i].train for i in range(first)]
        data, replayed = replay_mix(examples, earlier, ctx.method.replay, seed=ctx.seed + ctx.k)
        return data, record | {"replay": replayed}


# `replay` is a plain number of the method (MethodConfig.replay), not a section of its own.
register_section(Section("replay", cls=None, part=lambda method: Replay(method), active=lambda m: m.replay > 0))
