"""The errors a request can fail with (the engine raises them; servers map them to answers)."""

from __future__ import annotations

from typing import Mapping


class PromptTooLong(ValueError):
    """The prompt does not fit the context window; carries both counts. `chars` set: the
    count is a lower bound from the text's length, found without tokenizing it."""

    def __init__(self, prompt_tokens: int, context: int, chars: int | None = None) -> None:
        self.prompt_tokens, self.context = prompt_tokens, context
        size = (f"is {prompt_tokens} tokens" if chars is None else
                f"is {chars} characters, so at least {prompt_tokens} tokens")
        super().__init__(
            f"prompt too long: the prompt {size}, but the model's context is "
            f"{context} tokens and needs room for at least one generated token "
            f"(shorten the prompt or history by {'at least ' if chars else ''}"
            f"{prompt_tokens - context + 1} tokens)"
        )


class RequestTooLarge(ValueError):
    """The request's worst case (prompt + max_tokens) exceeds a KV cache row as planned at
    setup: it could never run, even alone. Carries both numbers."""

    def __init__(self, prompt_tokens: int, max_tokens: int, capacity: int) -> None:
        self.worst_case, self.capacity = prompt_tokens + max_tokens, capacity
        fix = (f"lower max_tokens to at most {capacity - prompt_tokens}" if prompt_tokens < capacity
               else f"shorten the prompt to under {capacity} tokens")
        super().__init__(
            f"request too large for this server's KV cache: the prompt ({prompt_tokens} tokens) "
            f"plus max_tokens ({max_tokens}) needs up to {self.worst_case} positions, but a "
            f"cache row holds {capacity} (sized at setup from the memory there is); {fix}")


class OutOfMemory(RuntimeError):
    """The device ran out of memory during one request's prefill or one decoding step: those
    requests fail with this, the engine frees what they held and serves on."""


class SetupError(RuntimeError):
    """The device, the weights or the checkpoint cannot serve as asked; the message says what
    was found and what to change. Raised before serving starts: every door reports it as one
    line, never a traceback."""


class InputError(ValueError):
    """Bad input from a user; `field` names what was bad (an API's `param`), when one did."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def renamed(self, names: Mapping[str, str]) -> str:
        """The message with its field called by `names` (a door's spelling: the engine's
        `structured` is the API's response_format, Cog's json_schema, the CLI's --regex)."""
        return rename(self.field, str(self), names)


def rename(field: str | None, message: str, names: Mapping[str, str]) -> str:
    """`message`, which starts with `field`'s name, with that name spelled as `names` has it."""
    if field in names and message.startswith(field):
        return names[field] + message[len(field):]
    return message


class HistoryError(InputError):
    """Bad chat history or message text; the message names the offending item and what was
    expected."""


def check_text(field: str, text: str) -> None:
    """Rejects text that is not valid Unicode (a lone surrogate), which SentencePiece cannot take.

    Lone surrogates come from JSON escapes like "\\ud800" and from command-line bytes that are
    not UTF-8 (Python decodes argv with surrogateescape).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HistoryError(
            f"{field}: not valid Unicode text (lone surrogate U+{ord(text[e.start]):04X} "
            f"at character {e.start}); send UTF-8 text", field
        ) from None
