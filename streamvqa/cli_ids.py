"""Ids given on the command line (stream ids, query ids), checked before anything connects.

The rule is the records' own (:func:`streamvqa.schemas.validate_id`: 1-128 characters from
``[A-Za-z0-9._-]``, starting with a letter or digit, without ``..``), so an id the CLI accepts is
one every record will carry. A bad id ends the command with a one-line ``error: ...`` on stderr
and exit code 2 (:data:`INVALID_INPUT_EXIT`: bad input, like invalid settings), never a traceback.
"""

from __future__ import annotations

import typer

__all__ = ["INVALID_INPUT_EXIT", "checked_id"]

INVALID_INPUT_EXIT = 2


def checked_id(value: str, option: str, field: str = "stream_id") -> str:
    """``value`` if it is a valid id; otherwise print why (naming ``option``, the parameter as the
    user typed it) and exit with :data:`INVALID_INPUT_EXIT`."""
    from streamvqa.schemas import InvalidField, validate_id

    try:
        return validate_id(value, field)
    except InvalidField as err:
        typer.echo(f"error: {option}: {err}", err=True)
        raise typer.Exit(INVALID_INPUT_EXIT) from None
