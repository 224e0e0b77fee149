"""Copying a model's support files (config, generation config, tokenizer, chat template, README).

One copier for every artifact cairn writes next to new weights (merged models, merged adapters,
Mixtral mixtures): every top-level regular file that is not a weight file, not hidden, and not
named in ``skip``; or, with ``only``, just those names when present.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

#: Weight files (and their indexes) are never support files.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf",
                   ".msgpack", ".h5", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def copy_support_files(src: Path, dst: Path, skip: Iterable[str] = (), only: Iterable[str] | None = None) -> list[str]:
    """Copy ``src``'s support files into ``dst``; returns the names copied, sorted."""
    skip, keep = set(skip), None if only is None else set(only)
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.endswith(WEIGHT_SUFFIXES) or f.name in skip:
            continue
        if keep is not None and f.name not in keep:
            continue
        shutil.copy2(f, Path(dst) / f.name)
        copied.append(f.name)
    return copied
