"""The tokenizer's chat template split around one user turn (used by ``GateKV.answer`` and the eval prompts)."""

from __future__ import annotations

__all__ = ["chat_template_parts"]

_PLACEHOLDER = "\x00GATEKV_USER_CONTENT\x00"


def chat_template_parts(tokenizer) -> tuple[str, str]:
    """Text of ``tokenizer``'s chat template before and after one user turn's content (default system prompt in the
    head, end of the turn and assistant header in the tail)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=True
    )
    if rendered.count(_PLACEHOLDER) != 1:
        raise ValueError("the tokenizer's chat template does not render the user content verbatim")
    head, tail = rendered.split(_PLACEHOLDER)
    return head, tail
