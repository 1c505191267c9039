"""How a stream's memory reads as a prompt: the sink (system turn), the stream, the question.

The stream's content sits inside one user turn that stays open while the stream runs; a
question closes it and opens the assistant turn:

    <sink: system prompt + start of the user turn> <chunk> <chunk> ... <question + assistant turn>

:class:`ChatFormat` writes ChatML (SmolLM2, Qwen2/2.5, Qwen2.5-VL, LLaVA-OneVision's Qwen2);
:class:`PlainFormat` writes plain text for base models and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM = (
    "You are watching a live stream. Its transcript and notes follow, in time order. "
    "Answer the question about it briefly, using only what the stream said or showed."
)


class PromptFormat:
    stop_markers: tuple[str, ...] = ()

    def sink(self, system_prompt: str | None) -> str:
        raise NotImplementedError

    def question(self, question: str) -> str:
        """The text prefilled after the context, ending where the answer starts."""
        raise NotImplementedError

    def retrieval_query(self, question: str) -> str:
        """The text whose mean pre-RoPE query scores the blocks (ReKV: the question itself)."""
        return question


@dataclass(frozen=True)
class ChatFormat(PromptFormat):
    system: str = DEFAULT_SYSTEM
    stop_markers: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")

    def sink(self, system_prompt: str | None) -> str:
        return f"<|im_start|>system\n{system_prompt or self.system}<|im_end|>\n<|im_start|>user\n"

    def question(self, question: str) -> str:
        return f"\n\nQuestion: {question.strip()}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class PlainFormat(PromptFormat):
    system: str = DEFAULT_SYSTEM

    def sink(self, system_prompt: str | None) -> str:
        return f"{system_prompt or self.system}\n\n"

    def question(self, question: str) -> str:
        return f"\n\nQuestion: {question.strip()}\nAnswer:"
