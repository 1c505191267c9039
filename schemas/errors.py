"""Typed errors raised by the streamvqa record codec.

Every failure to decode or validate a record is a :class:`SchemaError`. Each
subclass carries a short, stable ``reason`` code (it is written to the
dead-letter topic, so dashboards and alerts can key on it), the ``field`` the
problem concerns (``None`` when it is not about one field) and a human message
that says exactly what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "InvalidField",
    "MalformedMessage",
    "OversizedMessage",
    "SchemaError",
    "SchemaMismatch",
    "TruncatedMessage",
    "WrongRecordType",
    "WrongVersion",
]


class SchemaError(ValueError):
    """Base class: a message or record does not conform to its schema."""

    reason: ClassVar[str] = "schema_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, field={self.field!r}, {self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps subclasses with extra keyword attributes picklable (Beam ships
        # exceptions between workers).
        return (type(self), (self.message, self.field), dict(self.__dict__))


class OversizedMessage(SchemaError):
    """The message is larger than ``Limits.max_message_bytes`` (checked before parsing)."""

    reason = "oversized"


class MalformedMessage(SchemaError):
    """The bytes are not an Arrow IPC stream, or the stream is corrupt."""

    reason = "malformed"


class TruncatedMessage(SchemaError):
    """The bytes are a valid prefix of an Arrow IPC stream that ends early."""

    reason = "truncated"


class WrongRecordType(SchemaError):
    """The message holds another record type than the one expected."""

    reason = "wrong_type"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        expected: str | None = None,
        found: str | None = None,
    ) -> None:
        super().__init__(message, field)
        self.expected = expected
        self.found = found


class WrongVersion(SchemaError):
    """The message was written with a schema version this code does not support."""

    reason = "wrong_version"

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        found: object = None,
        supported: Sequence[int] = (),
    ) -> None:
        super().__init__(message, field)
        self.found = found
        self.supported = tuple(supported)


class SchemaMismatch(SchemaError):
    """The Arrow schema's fields or types differ from the expected schema."""

    reason = "schema_mismatch"


class InvalidField(SchemaError):
    """A value breaks a validation rule; ``field`` names the field (a path such as
    ``evidence[2].end_us`` for nested values)."""

    reason = "invalid_field"
