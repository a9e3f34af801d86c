"""Evaluation: offline long-context task generators (no downloads)."""

from gatekv.eval.needle import NeedlePrompt, chat_template_parts, haystack_sentences, needle_prompt

__all__ = ["NeedlePrompt", "chat_template_parts", "haystack_sentences", "needle_prompt"]
