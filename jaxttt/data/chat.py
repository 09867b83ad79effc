"""Chat templates: the checkpoint's own Jinja template, rendered the way Hugging Face does.

Templates come from downloaded checkpoints, so they render in Jinja's immutable sandbox (no
attribute access to Python internals), with the globals and filters transformers provides:
`raise_exception`, `strftime_now`, `tojson`, loop controls, trim_blocks and lstrip_blocks.
"""
from __future__ import annotations

import datetime
import functools
import json

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxttt.errors import UserError


class ChatTemplateError(UserError, ValueError):
    """A chat template is malformed, or refused the messages (its raise_exception)."""


def _raise(message):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template line {e.lineno}: {e.message}") from None


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The prompt text of `messages` ([{"role", "content"}, ...]) under `template`."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r}")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
