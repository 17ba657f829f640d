"""A row's values as the data holds them, and what a task may take as its text.

datasets types a JSON lines column whose values mix types (`"hello"` in one line, `12345` or `[1, 2]` in another)
as `Json`: Arrow's JSON extension type, whose values are each value's JSON literal (`'"hello \\u00e9"'`, quotes and
escapes included). Read as they are, those literals would reach the model as text; here they are decoded first, so
a string is the string it is and a number stays a number, which a text input then refuses by its type.
"""

from __future__ import annotations

import datetime
import decimal
import json
import numbers

import pyarrow as pa


def column_values(table: pa.Table, name: str) -> list:
    """The column's values as Python objects; a JSON-typed column's values decoded from their JSON literals."""
    column = table.column(name)
    values = column.to_pylist()
    if isinstance(column.type, pa.JsonType):
        return [None if value is None else json.loads(value) for value in values]
    return values


def is_number(value) -> bool:
    """An int, a float or a decimal (a Parquet decimal column), not a bool (which Python counts as an int)."""
    return isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool)


def kind_of(value) -> str:
    """What a value is, in the words of the data rather than of Python: 'a number', 'a list', 'an object'."""
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return "a boolean"
    if is_number(value):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return type(value).__name__


def text_error(column: str, value) -> str | None:
    """Why the input column's value cannot be a row's text, or None when it is text."""
    if isinstance(value, str):
        return None
    if value is None:
        return f"input column {column!r} is null"
    return f"input column {column!r} holds {kind_of(value)}, not text"


def prompt_field_error(field: str, value) -> str | None:
    """Why a value cannot fill a model.prompt field, or None: text, numbers and dates fill one (`{score:.2f}` formats
    a number, `{day:%Y}` a date); a null, a boolean, a list or an object is not coerced to words the row does not
    hold."""
    if isinstance(value, (str, datetime.date, datetime.time)) or is_number(value):
        return None
    if value is None:
        return f"prompt field {field!r} is null"
    return f"prompt field {field!r} holds {kind_of(value)}, not text or a number"
