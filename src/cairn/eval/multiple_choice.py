"""Batched log-likelihood scoring of multiple-choice questions, the way lm-evaluation-harness does it.

A question is a list of ``(context, continuation)`` pairs, one per choice; the score of a choice is
``log p(continuation | context)`` summed over the continuation's tokens. This is lm-evaluation-harness's
``loglikelihood`` request (Gao et al., "The Language Model Evaluation Harness", Zenodo 10256836;
the multiple-choice protocol of Brown et al. 2020, arXiv:2005.14165), and its tokenisation is matched
exactly so the numbers agree:

- trailing whitespace of the context moves to the front of the continuation;
- ``context_tokens = encode(context)`` and ``continuation_tokens = encode(context + continuation)
  [len(context_tokens):]`` (the whole string is encoded and split, so a word boundary is tokenised as
  it would be in running text), with the tokenizer's default special tokens;
- an empty context is replaced by the prefix token (BOS, else EOS);
- the model input is ``(context_tokens + continuation_tokens)[:-1]``, left-truncated to the model's
  length when too long.

What is different is only how the work is laid out, for speed:

1. **The shared prefix is computed once.** The input sequences of a question's choices share a
   token prefix (the whole context for most tasks; the sentence up to the blank for WinoGrande).
   All choices of a question are packed into ONE row: ``prefix + branch_1 + ... + branch_k`` with
   a tree-shaped attention mask (a branch token sees the prefix and the earlier tokens of its own
   branch) and position ids that restart after the prefix for every branch. This is mathematically
   the same computation as k separate rows but processes ``|prefix| + sum |branch_i|`` tokens
   instead of ``k * |prefix| + sum |branch_i|``. lm-evaluation-harness shares only the special case
   of one-token continuations (its ``logits_cache``), e.g. MMLU's " A"/" B"/" C"/" D".
2. **Logits only where they are needed.** Rows are left-padded so every row's scored positions
   lie in a common tail, and the model is asked for the logits of that tail only
   (``logits_to_keep``); lm-evaluation-harness computes and log-softmaxes the logits of every
   position, which for a 49k-word vocabulary is a large share of the work on short prompts.
3. **Length-sorted batches** (longest first, as lm-evaluation-harness does, so memory problems
   show at once), with a cap on the logits held at a time.
4. **bf16 where it does not change the ranking** (``autocast=torch.bfloat16``): the forward pass runs
   under bf16 autocast (float32 weights, bf16 matmuls); :func:`cairn.eval.suites` then re-scores in
   float32 every question whose decision a bf16 rounding error could flip (see ``near_tie``), so the
   predictions are float32's and only the questions with a clear winner are left at bf16. How much
   that saves depends on the model: a weak model has many near ties (see benchmarks/eval_precision.py).

Under ``torchrun``/``accelerate launch`` the batches (formed exactly as in one process) are dealt
out round-robin to the processes and the scores gathered, so every process returns the full,
identical result; call it on EVERY process.

The packed and the unpacked computation agree to float rounding (tested against one-pair-at-a-time
scoring); a model whose attention ignores custom 4-D masks would silently break the packing, so
``share_prefix=False`` scores one pair per row instead (same tokenisation, still tail-only logits).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from cairn.cpu_allocator import keep_freed_memory

Pair = tuple[str, str]


@dataclass
class _Row:
    """One packed model input: a question's shared prefix and one branch per pair."""

    question: int
    pairs: list[int]  # indices into the question's pairs, one per branch
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0 = shared prefix, i + 1 = branch of pair ``pairs[i]``
    # for each pair: (packed index of the hidden state predicting each continuation token, target ids)
    targets: list[tuple[list[int], list[int]]]


def encode_pair(tokenizer, context: str, continuation: str, prefix_token_id: int) -> tuple[list[int], list[int]]:
    """Token ids of ``(context, continuation)`` split exactly as lm-evaluation-harness splits them."""
    if not context:
        return [prefix_token_id], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    context_ids = tokenizer(context)["input_ids"]
    whole_ids = tokenizer(context + continuation)["input_ids"]
    return context_ids, whole_ids[len(context_ids):]


def prefix_token_id(tokenizer) -> int:
    """lm-evaluation-harness's stand-in context for an empty one: BOS when defined, else EOS."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id


def _model_max_length(model) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048  # lm-evaluation-harness's default when the config names no length


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest and all(s[n] == seqs[0][n] for s in seqs[1:]):
        n += 1
    return n


def _pack(question: int, encoded: list[tuple[list[int], list[int]]], pair_ids: list[int], max_len: int,
          share: bool) -> list[_Row]:
    """Lay out the pairs ``pair_ids`` of one question as packed rows (one row when sharing)."""
    inputs, starts = [], []
    for i in pair_ids:
        ctx, cont = encoded[i]
        full = (ctx + cont)[-(max_len + 1):]  # lm-eval: left-truncate to the model length, then drop the last
        inputs.append(full[:-1])
        starts.append(len(full) - len(cont))  # index in ``full`` of the first continuation token
    if not share or len(pair_ids) == 1:
        groups = [[k] for k in range(len(pair_ids))]
    else:
        groups = [list(range(len(pair_ids)))]
        packed = _common_prefix_len(inputs) + sum(len(s) - _common_prefix_len(inputs) for s in inputs)
        if packed > max_len:  # too long to pack: one pair per row, as unshared scoring would do
            groups = [[k] for k in range(len(pair_ids))]
    rows = []
    for group in groups:
        seqs = [inputs[k] for k in group]
        p = _common_prefix_len(seqs) if len(seqs) > 1 else len(seqs[0])
        tokens, positions, segments = list(seqs[0][:p]), list(range(p)), [0] * p
        targets = []
        for b, k in enumerate(group):
            ctx, cont = encoded[pair_ids[k]]
            offset = len(tokens)
            branch = inputs[k][p:]
            tokens += branch
            positions += range(p, p + len(branch))
            segments += [b + 1] * len(branch)
            # token j of the full sequence (j >= starts[k]) is predicted by the hidden state at j - 1
            idx = [(j - 1) if (j - 1) < p else offset + (j - 1 - p) for j in range(starts[k], starts[k] + len(cont))]
            targets.append((idx, list(cont)))
        rows.append(_Row(question, [pair_ids[k] for k in group], tokens, positions, segments, targets))
    return rows


def _tree_mask(segments: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask ``[B, 1, L, L]`` for packed rows (left padding has ``valid`` False).

    Query ``a`` may attend key ``b <= a`` when ``b`` is in the shared prefix (segment 0) or in the same
    branch. Padding attends only to itself so its softmax row is not empty (an all-masked row gives
    NaN, and NaN values would leak into real rows through ``0 * NaN``).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    seg_q = segments[:, :, None]
    seg_k = segments[:, None, :]
    allowed = causal & ((seg_k == 0) | (seg_k == seg_q)) & valid[:, None, :] & valid[:, :, None]
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _accepts_logits_to_keep(model) -> bool:
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def score_pairs(
    model,
    tokenizer,
    questions: Sequence[Sequence[Pair]],
    batch_size: int = 16,
    share_prefix: bool = True,
    max_logits: int = 2**26,
    progress: bool = False,
    desc: str = "log-likelihood",
    autocast: torch.dtype | None = None,
) -> list[list[float]]:
    """Summed continuation log-probabilities: ``result[q][i] = log p(cont_i | ctx_i)`` for question ``q``.

    ``batch_size`` bounds the packed rows per forward pass; ``max_logits`` bounds the number of
    float logits materialised at once (rows x kept positions x vocabulary), so long-continuation
    tasks take smaller batches instead of running out of memory. ``autocast`` (e.g. ``torch.bfloat16``)
    runs the forward passes under ``torch.autocast``; the log-softmax is always taken in float32.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory()  # cairn.cpu_allocator: no page faults on each batch's re-allocations
    max_len = _model_max_length(model)
    prefix_id = prefix_token_id(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    rows: list[_Row] = []
    for q, pairs in enumerate(questions):
        encoded = [encode_pair(tokenizer, c, x, prefix_id) for c, x in pairs]
        for i, (_, cont) in enumerate(encoded):
            if not cont:
                raise ValueError(f"question {q}, choice {i}: the continuation {pairs[i][1]!r} has no tokens")
        rows += _pack(q, encoded, list(range(len(pairs))), max_len, share_prefix)
    rows.sort(key=lambda r: (-len(r.tokens), r.question))
    scores: list[list[float]] = [[0.0] * len(p) for p in questions]
    tail_ok = _accepts_logits_to_keep(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_id
    dtype = next(model.parameters()).dtype
    from cairn import dist

    bar = tqdm(total=len(questions), desc=desc, disable=not progress or not dist.is_main(), leave=False)
    done_pairs = [0] * len(questions)
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < len(rows):
        # grow the batch while rows and the materialised logits stay within their budgets
        end = start + 1
        keep = len(rows[start].tokens) - min(min(i) for i, _ in rows[start].targets)
        while end < len(rows) and end - start < batch_size:
            row_keep = len(rows[end].tokens) - min(min(i) for i, _ in rows[end].targets)
            k = max(keep, row_keep)  # left padding does not move a row's tail: keep = len - first index
            if (end - start + 1) * k * vocab > max_logits:
                break
            keep, end = k, end + 1
        bounds.append((start, end))
        start = end
    world = dist.world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    mine = bounds[dist.rank()::world] if world > 1 else bounds
    computed: list[tuple[int, int, float]] = []
    for start, end in mine:
        batch = rows[start:end]
        length = len(batch[0].tokens)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        pos = torch.zeros((len(batch), length), dtype=torch.long)
        seg = torch.full((len(batch), length), -1, dtype=torch.long)
        for b, row in enumerate(batch):
            pad = length - len(row.tokens)
            ids[b, pad:] = torch.tensor(row.tokens)
            pos[b, pad:] = torch.tensor(row.positions)
            seg[b, pad:] = torch.tensor(row.segments)
        valid = seg >= 0
        mask = _tree_mask(seg, valid, dtype)
        # the earliest scored position over the batch (in padded coordinates) fixes the kept tail
        first = min(length - len(r.tokens) + min(min(i) for i, _ in r.targets) for r in batch)
        kwargs = {"logits_to_keep": length - first} if tail_ok else {}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=False, **kwargs)
        logits = out.logits
        offset = length - logits.shape[1]  # padded index of the first kept logit
        for b, row in enumerate(batch):
            logprobs = torch.log_softmax(logits[b].float(), dim=-1)
            pad = length - len(row.tokens)
            for pair, (idx, target) in zip(row.pairs, row.targets):
                at = torch.tensor([pad + i - offset for i in idx], device=logprobs.device)
                tgt = torch.tensor(target, device=logprobs.device)
                scores[row.question][pair] = float(logprobs[at, tgt].sum())
                computed.append((row.question, pair, scores[row.question][pair]))
            done_pairs[row.question] += len(row.pairs)
            if done_pairs[row.question] == len(questions[row.question]):
                bar.update(world)
    bar.close()
    if world > 1:
        for part in dist.gather_objects(computed):
            for q, pair, value in part:
                scores[q][pair] = value
    return scores


def continuation_token_counts(tokenizer, questions: Sequence[Sequence[Pair]]) -> list[list[int]]:
    """Number of scored tokens of every pair, tokenised exactly as :func:`score_pairs` does."""
    prefix_id = prefix_token_id(tokenizer)
    return [[len(encode_pair(tokenizer, c, x, prefix_id)[1]) for c, x in pairs] for pairs in questions]
