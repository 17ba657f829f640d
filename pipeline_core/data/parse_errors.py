"""Data files a reader cannot parse: telling such a failure from one a retry may cure, and finding its file and line.

A JSON line cut in half, a lone surrogate (`\\ud800`), bytes that are not UTF-8 or a CSV line with a field too many
fail the same way on every retry, so they exit 2, naming what to fix. The readers' errors do not say where: Arrow
counts rows from the start of the block it parsed, pandas counts records (a quoted field may span lines), and
neither names the file. So after a failure the job's local files are read again here, in datasets' order: JSON lines
and text line by line (the first line that fails on its own is the one), a CSV through datasets, whose parser's
record number is mapped to the file's lines. Arrow's JSON reader lets bytes that are not UTF-8 through, so every
table read is checked (check_text) before its values reach a tokenizer or an output part.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from dataclasses import dataclass

import pyarrow as pa
from pandas.errors import ParserError

from pipeline_core.data.files import one_line, read_alone, reader_error

# pandas' CSV parser counts records from the file's start, blank and skipped lines included: 1-based "in line N",
# 0-based "starting at row N" (a quote never closed)
_CSV_RECORD = re.compile(r" in line (?P<line>\d+)| starting at row (?P<row>\d+)")
_PANDAS_PREFIX = "Error tokenizing data. C error: "


class InvalidText(ValueError):
    """A string column holds bytes that are not UTF-8."""


@dataclass(frozen=True)
class Unparsable:
    """Where a file cannot be parsed: its 1-based line where it can be told, and why."""

    file: str
    line: int | None
    why: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file} cannot be parsed: {self.why}"
        return f"{self.file}, line {self.line}: {self.why}"


def is_parse_error(error: BaseException) -> bool:
    """Whether a reader failed on the bytes themselves (a retry reads the same ones), not on reaching them."""
    error = reader_error(error)
    if isinstance(error, (InvalidText, UnicodeError, ParserError, json.JSONDecodeError)):
        return True
    if type(error).__name__ == "JSONDecodeError":  # ujson's, for a file holding one JSON document
        return True
    return isinstance(error, pa.ArrowInvalid) and "parse error" in str(error)  # JSON (and pyarrow CSV) parse errors


def check_text(table: pa.Table, first_row: int) -> pa.Table:
    """The table, once its strings are known to be UTF-8; InvalidText naming the first row_id and column that are
    not. About a millisecond for 4 MB of text."""
    try:
        table.validate(full=True)
    except pa.ArrowInvalid as error:
        if "UTF8" not in str(error):
            raise
        name, row = _first_invalid(table)
        raise InvalidText(f"column {name!r} of row_id {first_row + row} holds bytes that are not valid UTF-8") from None
    return table


def _first_invalid(table: pa.Table) -> tuple[str, int]:
    """The first column whose values do not validate, and its first such row, by halving (any nested type)."""
    for name, column in zip(table.column_names, table.columns, strict=True):
        if not _valid(column):
            good, bad = 0, len(column)  # the first `good` rows validate, the first `bad` do not
            while bad - good > 1:
                middle = (good + bad) // 2
                good, bad = (middle, bad) if _valid(column.slice(0, middle)) else (good, middle)
            return name, bad - 1
    return table.column_names[0], 0


def _valid(values) -> bool:
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def find_unparsable(builder: str, files: list[str], options: dict | None) -> Unparsable | None:
    """After reading `files` failed on their bytes, the first file in their order that cannot be parsed, with its
    line: JSON lines and text are scanned (exact), a file still unexplained is read alone through datasets, a CSV's
    record number mapped to its lines. None when no file fails on its own."""
    options = options or {}
    for file in files:
        spot = _bad_line(builder, file, options)
        if spot is None:
            try:
                read_alone(builder, file, options)
            except Exception as error:  # noqa: BLE001 - any failure to read this file alone names it
                spot = _reader_spot(builder, file, reader_error(error), options)
        if spot is not None:
            return spot
    return None


def _bad_line(builder: str, file: str, options: dict) -> Unparsable | None:
    """The first line of a JSON lines, CSV or text file that cannot be decoded, or (JSON) is not one JSON object."""
    if builder not in ("json", "csv", "text") or not _lines_split_bytes(options):
        return None
    if builder == "json" and (options.get("field") is not None or _starts_a_document(file)):
        return _bad_document(file, options)
    encoding, errors = options.get("encoding") or "utf-8", options.get("encoding_errors") or "strict"
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode(encoding, errors)
            except UnicodeDecodeError as error:
                return Unparsable(file, number, _undecodable(error, encoding))
            why = _json_line_problem(text.removeprefix("\ufeff").rstrip("\r\n")) if builder == "json" else None
            if why:
                return Unparsable(file, number, why)
    return None


def _json_line_problem(text: str) -> str | None:
    if not text.strip():
        return None  # blank lines are skipped
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as error:
        why = _json_error(error) if isinstance(error, json.JSONDecodeError) else str(error)
        return f"not valid JSON ({why})"
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__} where each line must hold one object"
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:  # json.loads takes a lone "\ud800" escape; no reader of UTF-8 does
        return f"a lone surrogate \\u{ord(error.object[error.start]):04x} in a string, which is not valid Unicode"
    return None


def _json_error(error: json.JSONDecodeError) -> str:
    """json's message with the column alone, the line being named on its own: "Unterminated string starting at
    column 24"."""
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _undecodable(error: UnicodeDecodeError, encoding: str) -> str:
    return f"bytes that are not valid {encoding} ({error.object[error.start:error.end]!r} at byte {error.start + 1})"


def _lines_split_bytes(options: dict) -> bool:
    """Whether the file's lines are its byte lines: not so in UTF-16 or UTF-32, where a newline is several bytes."""
    return not codecs.lookup(options.get("encoding") or "utf-8").name.startswith(("utf-16", "utf-32"))


def _starts_a_document(file: str) -> bool:
    """A JSON file holding one array (datasets reads its items as rows) rather than one object a line."""
    with open(file, "rb") as handle:
        return handle.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"[")


def _bad_document(file: str, options: dict) -> Unparsable | None:
    """Where a file holding one JSON document stops being JSON."""
    with open(file, "rb") as handle:
        data = handle.read()
    encoding = options.get("encoding") or "utf-8"
    try:
        text = data.decode(encoding, options.get("encoding_errors") or "strict")
    except UnicodeDecodeError as error:
        return Unparsable(file, data.count(b"\n", 0, error.start) + 1, _undecodable(error, encoding))
    try:
        json.loads(text.removeprefix("\ufeff"), parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        return Unparsable(file, error.lineno, f"not valid JSON ({_json_error(error)})")
    except ValueError as error:
        return Unparsable(file, None, f"not valid JSON ({error})")
    return None


def _reader_spot(builder: str, file: str, error: BaseException, options: dict) -> Unparsable:
    """A file that failed read alone, in its reader's words; a CSV parser's record number becomes the file's line
    (its bytes that are not text were found by _bad_line already)."""
    why = one_line(str(error))
    match = _CSV_RECORD.search(why) if builder == "csv" else None
    if match is None:
        return Unparsable(file, None, why)
    record = int(match["line"]) if match["line"] else int(match["row"]) + 1
    line = _csv_record_line(file, record, options)
    if line is None:
        return Unparsable(file, None, why)
    return Unparsable(file, line, (why[:match.start()] + why[match.end():]).removeprefix(_PANDAS_PREFIX))


def _csv_record_line(file: str, record: int, options: dict) -> int | None:
    """The line where the CSV's `record`-th record (1-based, pandas' count) starts; None where Python's csv module
    cannot split the file as pandas does (a separator of several characters, another line terminator)."""
    sep = options.get("delimiter") or options.get("sep") or ","
    if len(sep) != 1 or options.get("lineterminator") is not None:
        return None
    dialect = {"delimiter": sep, "quotechar": options.get("quotechar") or '"', "quoting": options.get("quoting", 0),
               "doublequote": options.get("doublequote", True), "escapechar": options.get("escapechar"),
               "skipinitialspace": options.get("skipinitialspace", False)}
    encoding = options.get("encoding") or "utf-8"
    with open(file, newline="", encoding=encoding, errors="replace") as handle:
        reader = csv.reader(handle, **dialect)
        start = 1
        try:
            for number, _ in enumerate(reader, start=1):
                if number == record:
                    return start
                start = reader.line_num + 1
        except csv.Error:
            return None
    return None
