"""Bad-sample reasons and the exceptions that carry them.

Every reason is a fixed key of the per-epoch counters. A :class:`BadSample` is raised by the
record/image/tokenization code; the dataset turns it into a skip (counted) or into a
:class:`BadSampleError` (``on_bad_sample="raise"``). Messages always name the record id and the file.
"""
from __future__ import annotations

# Structural problems, found when the index is built (the record never enters the index).
INDEX_REASONS = (
    "invalid_record",  # not an object, or a field of the wrong type
    "missing_conversations",  # no / empty ``conversations``
    "unknown_role",  # a turn whose ``from`` is not human / gpt
    "bad_turn_order",  # turns do not alternate human, gpt, human, ...
    "empty_answer",  # every gpt turn is empty or whitespace-only (a single empty one is only masked)
    "no_answer",  # no gpt turn at all: nothing could be trained
    "unencodable_text",  # a string no tokenizer can take (e.g. a lone UTF-16 surrogate, legal in JSON)
)
# Problems found when a sample is prepared (in the dataloader workers).
RUNTIME_REASONS = (
    "missing_image",  # image file does not exist
    "unsafe_image_path",  # an image path that leaves image_folder (absolute, "..", or a symlink outside)
    "image_too_large",  # more decoded pixels than max_image_pixels
    "corrupt_image",  # unreadable / truncated image file
    "unsupported_image",  # an image mode that cannot be converted to RGB
    "template_mismatch",  # e.g. the ``plain`` template on a multi-turn or text-only record
    "too_long",  # does not fit ``model_max_length`` without cutting the image span
    "no_trained_tokens",  # no trained token left (e.g. truncation removed every answer)
    "tokenization_drift",  # a piece boundary fell inside a token (labels would be ambiguous)
    "preprocess_error",  # any other exception while preparing the sample (its class is in the message)
)
REASONS = INDEX_REASONS + RUNTIME_REASONS


class BadSample(Exception):
    """A record that cannot become a training sample; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; valid: {REASONS}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across dataloader worker processes
        return (type(self), (self.reason, self.message))


class BadSampleError(ValueError):
    """Raised for a bad sample under ``on_bad_sample="raise"``: ``"[reason] <message naming id and file>"``.

    Constructible from the message alone, so a dataloader worker can re-raise it in the main process.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(f"[{reason}] {message}" if reason else message)
        if not reason and message.startswith("[") and "]" in message:
            reason = message[1:message.index("]")]
        self.reason = reason


class TooManyBadSamplesError(RuntimeError):
    """The fraction of bad samples exceeded ``max_bad_fraction``."""


def where(record_id: object, position: int, path: str) -> str:
    """The standard prefix of every message: record id, position in the file, file path."""
    return f"record id={record_id!r} (#{position}) in {path}"
