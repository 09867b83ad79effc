"""Loop prompts through an instruct model's chat template (TTT-Discover, SDFT).

With a chat template in use, a prompt text becomes ONE user turn followed by the template's
generation prompt (`tokenizer.chat_ids`); without one, loops keep their raw `[EOS] + text`
encoding. A prompt too long for the room left is cut from the left of the user's text, never
of the template (its system preamble and the assistant header stay intact).
"""
from __future__ import annotations

from jaxttt.config import chat_mode
from jaxttt.errors import UserError


def use_chat(tokenizer, mode: bool | str) -> bool:
    """Whether prompts go through the chat template: `auto` = when the tokenizer has one."""
    mode = chat_mode(mode)
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has:
        raise UserError(f"config key 'chat': 'on', but the tokenizer {tokenizer.path} has no chat "
                        "template (not an instruct model); use auto or off")
    return has and mode != "off"


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_prompt_ids(tokenizer, text: str, max_len: int) -> list[int]:
    """`text` as one user turn plus the generation prompt, at most `max_len` tokens."""
    ids = tokenizer.chat_ids(user_turn(text))
    if len(ids) <= max_len:
        return ids
    text_ids = tokenizer.encode(text)
    overhead = len(ids) - len(text_ids)  # the template's own tokens (approximately)
    for slack in (0, 4, 16, 64):  # re-tokenising a cut text can merge differently at the seam
        keep = max_len - overhead - slack
        if keep < 1:
            break
        ids = tokenizer.chat_ids(user_turn(tokenizer.decode(text_ids[-keep:])))
        if len(ids) <= max_len:
            return ids
    raise ValueError(f"the chat template alone takes about {overhead} tokens, which leaves no "
                     f"room for the prompt within {max_len} tokens")
