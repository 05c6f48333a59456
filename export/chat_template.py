"""Rendering a Hugging Face chat template (Jinja) the way transformers does.

transformers renders `tokenizer_config.json`'s `chat_template` (or `chat_template.jinja`) in
jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the loop-control extension, a
`raise_exception(message)` global that templates call to refuse a conversation, `strftime_now`,
and a `tojson` that keeps non-ASCII text as it is. The same environment here: a template renders
to the same string, so the ids equal `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from export.errors import ConfigError, InputError


class TemplateRefused(Exception):
    """What a template's raise_exception(...) raises: the conversation is not one it accepts."""


def _raise_exception(message: str):
    raise TemplateRefused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want the JSON itself.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compiled(source: str, origin: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"{origin}: the chat template is not valid Jinja (line {err.lineno}: {err.message}); "
                          "fix the template or re-download the tokenizer files") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as dicts with a string role and string content, or one InputError naming the first bad one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"chat messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"chat message {index} is a {type(message).__name__}; "
                             "each message must be a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InputError(f"chat message {index} has role {role!r}; the role must be a non-empty string")
        if not isinstance(content, str):
            raise InputError(f"chat message {index} ({role}) has content of type {type(content).__name__}; "
                             "content must be a string")
        out.append(dict(message))
    return out


def render_chat(source: str, origin: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                special_tokens: Mapping[str, str]) -> str:
    """The template applied to `messages`; `special_tokens` are bos_token, eos_token, ... as strings
    (what transformers passes). A template's raise_exception becomes an InputError."""
    template = _compiled(source, origin)
    try:
        return template.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               **special_tokens)
    except TemplateRefused as err:
        raise InputError(f"the chat template of {origin} refuses this conversation: {err}") from None
    except jinja2.TemplateError as err:
        raise ConfigError(f"{origin}: the chat template failed to render ({err}); fix the template") from None
