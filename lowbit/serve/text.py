"""Text <-> token ids for the server: prompts, chat messages through the chat template, and the
cheap length bound checked before any tokenizing. The functions that touch the tokenizer are run
on the server's tokenizer threads (never on the event loop).
"""
from __future__ import annotations

import jinja2

from .protocol import ApiError

NO_TEMPLATE = ("the model has no chat template: send plain prompts to /v1/completions, or start the server "
               "with --chat-template FILE")


def max_token_chars(tokenizer) -> int:
    """The most characters one token stands for (an upper bound: the longest vocabulary entry)."""
    vocab = tokenizer.get_vocab()
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return max([len(t) for t in vocab] + [len(t) for t in added] + [1])


def check_chars(text_len: int, bound: int, max_len: int, where: str) -> None:
    """Refuse a text that cannot fit max_len tokens, before tokenizing it (a 10 MB prompt costs
    seconds of tokenizer time; its length costs nothing)."""
    if text_len > bound:
        raise ApiError(400, f"the {where} has {text_len} characters, more than {max_len} tokens (this server's "
                            f"context length) can hold", param=where)


def encode(model, prompt: str, add_special_tokens: bool = True) -> list[int]:
    return model.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]


def render_chat(model, messages: list[dict], template: str | None, add_generation_prompt: bool = True,
                continue_final_message: bool = False, kwargs: dict | None = None) -> list[int]:
    """A conversation through the chat template (`template` overrides the tokenizer's)."""
    tok = model.tokenizer
    if not (template or getattr(tok, "chat_template", None)):
        raise ApiError(400, NO_TEMPLATE, param="messages")
    try:
        ids = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message, tokenize=True,
                                      **(kwargs or {}))
    except jinja2.TemplateError as e:  # e.g. a template that wants alternating roles (its own message)
        raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise ApiError(400, f"the chat template cannot render these messages ({type(e).__name__})",
                       param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def chat_messages(messages) -> list[dict]:
    """ChatMessage models -> the dicts a chat template reads (text parts joined)."""
    out = []
    for m in messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            if any(part.type != "text" for part in m.content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            msg["content"] = "".join(part.text or "" for part in m.content)
        out.append(msg)
    return out


def message_chars(messages: list[dict]) -> int:
    return sum(len(m.get("content") or "") for m in messages)
