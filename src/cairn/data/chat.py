"""Chat-formatted examples: the tokenizer's own chat template, for training and evaluation alike.

A chat example carries ``messages``: the turns before the answer (system turns kept, the prompt as
the last user turn); its ``answer`` is the assistant turn to learn. Rendering uses transformers'
``tokenizer.apply_chat_template`` (the template shipped with the model, as TRL and lm-eval's
``--apply_chat_template`` use it); only the split into "prompt" and "answer" is done here:

- the prompt is the conversation rendered with ``add_generation_prompt=True``: exactly the text
  generation receives at evaluation, so training sees the same prompt tokens;
- the answer is what the full conversation (answer appended as an assistant turn) adds after that
  prompt: the answer text and the template's end-of-turn marker. Loss falls on it only.

Both are plain strings: a template's text may begin with the BOS token, which a tokenizer that adds
BOS itself would then double, so that leading BOS text is dropped and the tokenizer adds it once —
the token ids equal the template's own ``tokenize=True`` rendering.
"""

from __future__ import annotations

from cairn.errors import CairnError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_chat(example: dict) -> bool:
    return "messages" in example


def model_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "<this model>")


def require_chat_template(tokenizer, model: str | None = None, task: str | None = None) -> None:
    """A clear error when chat formatting is asked of a tokenizer that has no chat template."""
    if has_chat_template(tokenizer):
        return
    who = f"task {task!r}" if task else "a task"
    raise CairnError(
        f"{who} uses the chat template (`prompt_format: chat` or `format: messages`), but the tokenizer of "
        f"model {model or model_name(tokenizer)!r} has no chat template; use `prompt_format: plain` with "
        f"prompt/answer data, or a chat/Instruct model whose tokenizer ships a template")


def _adds_bos(tokenizer) -> bool:
    cached = getattr(tokenizer, "_cairn_adds_bos", None)
    if cached is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        cached = bos is not None and bos in tokenizer("", add_special_tokens=True)["input_ids"]
        try:
            tokenizer._cairn_adds_bos = cached
        except AttributeError:  # a tokenizer that refuses new attributes: recompute each time
            pass
    return cached


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    require_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja TemplateError: e.g. a template that refuses system turns
        roles = ", ".join(m.get("role", "?") for m in messages)
        raise CairnError(f"the chat template of model {model_name(tokenizer)!r} failed on a conversation with "
                         f"turns ({roles}): {exc}") from None
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def prompt_text(tokenizer, example: dict) -> str:
    """What the model is given for ``example``: the prompt, or the chat-rendered turns + generation prompt."""
    if not is_chat(example):
        return example["prompt"]
    return _render(tokenizer, example["messages"], add_generation_prompt=True)


def chat_parts(tokenizer, example: dict) -> tuple[str, str]:
    """(prompt text, answer text) of a chat example; their concatenation is the whole rendered conversation."""
    prompt = _render(tokenizer, example["messages"], add_generation_prompt=True)
    full = _render(tokenizer, example["messages"] + [{"role": "assistant", "content": example["answer"]}],
                   add_generation_prompt=False)
    if not full.startswith(prompt):
        raise CairnError(f"the chat template of model {model_name(tokenizer)!r} renders the turns before the answer "
                         f"differently once the answer is added, so the answer's tokens cannot be told apart "
                         f"for the loss; use `prompt_format: plain` for this model")
    return prompt, full[len(prompt):]
