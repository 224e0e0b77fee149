"""Built-in demo tasks: domains of fictional facts that no pretrained model can know.

Each domain invents entities (pronounceable names built from syllables) and gives each entity a value
for a few attributes, drawn from a small pool per attribute. Every fact is phrased with several
question templates: the training split uses three phrasings, the eval split a fourth and the test
split a fifth that training never shows, so the test measures whether the model learned the fact,
not whether it memorised a string. Everything is deterministic from the seed; nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYLLABLES = ["ka", "lo", "mi", "ra", "zu", "ve", "qua", "thi", "bor", "nel", "sar", "dru", "fen",
             "gal", "hix", "jor", "mop", "pel", "tov", "wex", "yal", "cre", "plo", "stu"]


@dataclass(frozen=True)
class Attribute:
    key: str
    values: tuple[str, ...]
    templates: tuple[str, ...]  # 5 question templates with {e}; 0-2 train, 3 eval, 4 test


@dataclass(frozen=True)
class Domain:
    name: str
    entity_kind: str
    attributes: tuple[Attribute, ...]


DOMAINS: dict[str, Domain] = {
    "zoology": Domain("zoology", "creature", (
        Attribute("colour", ("crimson", "teal", "amber", "violet", "silver", "olive"), (
            "What colour is the fur of the {e}?",
            "The {e} is covered in fur of which colour?",
            "Name the colour of the {e}'s fur.",
            "Which colour would you see on a {e}'s coat?",
            "If you met a {e}, what colour would its fur be?",
        )),
        Attribute("food", ("mosses", "beetles", "acorns", "kelp", "mushrooms", "pollen"), (
            "What does the {e} eat?",
            "The {e} feeds mainly on what?",
            "Name the favourite food of the {e}.",
            "What is the usual diet of a {e}?",
            "If you wanted to feed a {e}, what would you give it?",
        )),
    )),
    "geography": Domain("geography", "town", (
        Attribute("river", ("Orvel", "Tansk", "Miroa", "Dulbe", "Kesh", "Pranil"), (
            "Which river flows through the town of {e}?",
            "The town of {e} lies on which river?",
            "Name the river of {e}.",
            "What river runs past {e}?",
            "If you sailed to {e}, which river would you be on?",
        )),
        Attribute("export", ("copper", "wool", "salt", "glass", "timber", "honey"), (
            "What is the main export of {e}?",
            "The town of {e} is known for exporting what?",
            "Name the chief export of {e}.",
            "What does {e} sell to other towns?",
            "If you traded with {e}, what would you buy there?",
        )),
    )),
    "inventions": Domain("inventions", "inventor", (
        Attribute("device", ("lantern", "loom", "compass", "kettle", "pump", "clock"), (
            "What did the inventor {e} build?",
            "The inventor {e} is famous for which device?",
            "Name the invention of {e}.",
            "Which device was created by {e}?",
            "If you visited the workshop of {e}, what device would you find?",
        )),
        Attribute("city", ("Velmora", "Quistad", "Harnow", "Zelbruck", "Oskara", "Tirmin"), (
            "In which city did the inventor {e} work?",
            "The inventor {e} had a workshop in which city?",
            "Name the home city of {e}.",
            "Where did {e} do most of their inventing?",
            "If you wrote a letter to {e}, which city would you send it to?",
        )),
    )),
}

TRAIN_TEMPLATES = (0, 1, 2)
EVAL_TEMPLATE = 3
TEST_TEMPLATE = 4


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken and 4 <= len(name) <= 10:
            taken.add(name)
            names.append(name)
    return names


def _example(template: str, entity: str, value: str, domain: str) -> dict:
    # The " Answer:" suffix gives the model a fixed place to answer; the answer starts with a space
    # so that prompt + answer tokenises like natural text.
    return {"prompt": f"Question: {template.format(e=entity)}\nAnswer:", "answer": f" {value}",
            "type": "downstream", "domain": domain}


def generate_domain(name: str, seed: int = 0, entities: int = 16) -> dict[str, list[dict]]:
    """Train/eval/test splits of a fictional-facts domain, deterministic from ``seed``."""
    from cairn.errors import CairnError

    if name not in DOMAINS:
        raise CairnError(f"unknown demo domain {name!r}; available: {', '.join(DOMAINS)}")
    domain = DOMAINS[name]
    # Names are drawn from one stream for all domains so two domains never share an entity name.
    rng = random.Random(f"cairn-demo-{seed}")
    taken: set[str] = set()
    per_domain = {d: _names(rng, entities, taken) for d in DOMAINS}
    facts_rng = random.Random(f"cairn-demo-{seed}-{name}")
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "test": []}
    for entity in per_domain[name]:
        for attr in domain.attributes:
            value = facts_rng.choice(attr.values)
            for t in TRAIN_TEMPLATES:
                splits["train"].append(_example(attr.templates[t], entity, value, name))
            splits["eval"].append(_example(attr.templates[EVAL_TEMPLATE], entity, value, name))
            splits["test"].append(_example(attr.templates[TEST_TEMPLATE], entity, value, name))
    random.Random(f"cairn-demo-{seed}-{name}-order").shuffle(splits["train"])
    return splits
