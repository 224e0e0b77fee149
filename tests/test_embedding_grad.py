"""The deferred input-embedding gradient (cairn.train.embedding_grad): the same gradient as torch's
own embedding backward to float32 rounding, tied and untied, with a padding index and accumulation;
the same trained weights through the loop; the module is left as it was."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import cairn.train.loop as loop
from cairn.config import TrainingConfig
from cairn.data.encode import collate, encode_example
from cairn.methods.full import make_full_trainable
from cairn.train.embedding_grad import deferrable, deferred_embedding_grad
from cairn.train.loop import answer_token_loss, train

from conftest import make_tiny_llama

EXAMPLES = [{"prompt": f"Q{i}:" + "x" * (2 * i), "answer": f" a{i % 3}" + "y" * (i % 4)} for i in range(8)]


def tiny(tied: bool):
    model = make_tiny_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return make_full_trainable(model)


def _grads(model, batches, defer: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with deferred_embedding_grad(model, enabled=defer) as sinks:
        for batch in batches:  # two micro-batches accumulate, as with grad_accum 2
            total, _, _ = answer_token_loss(model, batch)
            total.backward()
            for sink in sinks:
                sink.flush()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
def test_deferred_gradient_equals_torchs(char_tokenizer, tied):
    model = tiny(tied)
    enc = [encode_example(char_tokenizer, ex, 64) for ex in EXAMPLES]
    batches = [collate(enc[:4], 0), collate(enc[4:], 0)]  # padded with id 0, the embedding's padding_idx
    assert model.model.embed_tokens.padding_idx == 0
    ref, got = _grads(model, batches, False), _grads(model, batches, True)
    assert ref.keys() == got.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
    emb = got["model.embed_tokens.weight"]
    if not tied:  # only looked-up rows have a gradient, and the padding row has none
        assert emb[0].abs().sum() == 0
        used = set(torch.cat([b["input_ids"].flatten() for b in batches]).tolist())
        rows = set(torch.nonzero(emb.abs().sum(dim=1)).flatten().tolist())
        assert rows and rows <= used - {0}


def test_the_module_is_restored_and_only_trainable_plain_embeddings_defer():
    model = tiny(True)
    emb = model.model.embed_tokens
    with deferred_embedding_grad(model) as sinks:
        assert [s.module for s in sinks] == [emb]
        assert "forward" in vars(emb)
    assert "forward" not in vars(emb) and not sinks[0].pending
    with deferred_embedding_grad(model, enabled=False) as sinks:
        assert sinks == []
    assert not deferrable(nn.Embedding(8, 4, max_norm=1.0))
    assert not deferrable(nn.Embedding(8, 4, sparse=True))
    frozen = nn.Embedding(8, 4)
    frozen.weight.requires_grad_(False)
    assert not deferrable(frozen)


def test_training_with_it_gives_the_weights_of_torchs_backward(char_tokenizer, monkeypatch):
    cfg = TrainingConfig(max_steps=4, lr=5e-3, batch_size=4, warmup_ratio=0.0, log_every=2, max_length=64,
                         grad_accum=2)
    weights = []
    for defer in (True, False):
        if not defer:
            monkeypatch.setattr(loop, "deferred_embedding_grad", lambda m, enabled=True: contextlib.nullcontext([]))
        model = tiny(True)
        train(model, char_tokenizer, EXAMPLES, cfg, seed=0, progress=False, log=lambda s: None)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k, v in weights[1].items():
        torch.testing.assert_close(weights[0][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.equal(weights[0]["model.embed_tokens.weight"], make_tiny_llama().model.embed_tokens.weight)
