"""Shared test fixtures: tiny models built from a config, a tiny tokenizer, the data pack location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models gain nothing from threads, and OpenMP threads spin badly on a busy 2-core machine.
    torch.set_num_threads(1)


def data_pack() -> Path | None:
    """The shared benchmark data pack: $CAIRN_DATA, else ../shared/data beside the repository."""
    candidate = Path(os.environ.get("CAIRN_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture
def data_dir() -> Path:
    path = data_pack()
    if path is None:
        pytest.skip("benchmark data pack not found: set CAIRN_DATA or place it at ../shared/data")
    return path


class CharTokenizer:
    """A minimal byte-level tokenizer with the slice of the HF tokenizer API cairn uses."""

    pad_token = "<pad>"
    eos_token = "<eos>"
    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = 2
    padding_side = "right"

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [3 + (b % 120) for b in text.encode("utf-8")]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=False):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i < 3:
                if not skip_special_tokens:
                    out.append(["<pad>", "<eos>", "<bos>"][i])
                continue
            out.append(chr(i - 3))
        return "".join(out)

    def save_pretrained(self, path):
        pass


def make_tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Save a tiny Llama and a character-level fast tokenizer as a Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    model = make_tiny_llama(seed=seed, vocab=len(vocab), hidden=32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


def write_arc_easy_subset(data_dir: Path, n: int = 6) -> Path:
    """``data_dir/old_knowledge/arc_easy/test.jsonl`` of ``n`` tiny questions laid out like the data pack's
    ARC-Easy (for old-knowledge tests on tiny models); returns ``data_dir``."""
    import json

    rows = [{"id": str(i), "question": f"Which word comes next {i}?",
             "choices": {"text": ["fox", "dog", "quick brown"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]}
            for i in range(n)]
    arc = Path(data_dir) / "old_knowledge" / "arc_easy" / "test.jsonl"
    arc.parent.mkdir(parents=True, exist_ok=True)
    arc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(data_dir)
