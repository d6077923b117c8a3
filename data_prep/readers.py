"""A team's own data file → rows as dicts: CSV (Excel's BOM, `,` `;` or tab, CRLF, quoted newlines), JSONL, a JSON
array, Parquet; instruction rows flattened; the team's column names mapped to the task's fields. Errors name the
file and the line (or item / row) and, through a mapping, the user's column."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from multitune.recipes.errors import InputError

Record = dict[str, Any]

# One row of a data file longer than this is refused: no sample a model trains on is 8 MiB of text, and reading
# such a line (a file without line breaks, a binary file) would only hold its whole size in memory.
MAX_LINE_BYTES = 8 << 20
# A whole-file JSON array is parsed at once (the json module has no streaming parser); past this size, JSONL.
MAX_JSON_ARRAY_BYTES = 1 << 30
SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
DELIMITERS = (",", ";", "\t")
_BOM = "\ufeff"
_SNIFF_LINES = 200


class FieldError(InputError):
    """A row's field is missing or has a value the task refuses; rendered with the user's column when mapped."""

    def __init__(self, where: str, field: str, problem: str | None = None):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(self.render({}))

    def render(self, columns: Mapping[str, str]) -> str:
        column = f" (column '{columns[self.field]}')" if self.field in columns else ""
        if self.problem is None:
            return f"{self.where}: missing field '{self.field}'{column}"
        return f"{self.where}: field '{self.field}'{column} {self.problem}"


def read_rows(path: str | Path, columns: Mapping[str, str] | None = None, delimiter: str | None = None,
              instruction_rows: bool = False, needed: tuple[str, ...] | None = None) -> Iterator[tuple[str, Record]]:
    """(where, row) for every row of a data file, streamed (a JSON array is the one format read whole).

    `where` is `file:line` (CSV, JSONL), `file[item]` (JSON array, 0-based) or `file:row N` (Parquet, 1-based).
    `columns` maps a task field to the user's column (`{"description": "Beschreibung"}`); `delimiter` forces the
    CSV separator (else sniffed from the first lines); `instruction_rows` flattens `{"input": {...}, "output":
    {...}}` rows into one record. A mapped column missing from a CSV or Parquet header is an error when its field
    is in `needed` (default: every mapped field). Raises InputError naming the file (and line) for anything
    unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported data file type '{path.suffix}' (use .csv, .tsv, .jsonl, .json or "
                         ".parquet)")
    columns = dict(columns or {})
    checked = {f: c for f, c in columns.items() if needed is None or f in needed}
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, delimiter or ("\t" if suffix == ".tsv" else None), checked)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, checked)
    elif suffix == ".json" and _starts_with_array(path):
        rows = _json_array_rows(path)
    else:  # .jsonl, or a .json file of one object per line
        rows = _jsonl_rows(path)
    for where, row in rows:
        if instruction_rows:
            row = _flatten_instruction(row, where)
        yield where, _mapped(row, columns)


def _mapped(row: Record, columns: dict[str, str]) -> Record:
    """The row with each mapped user column also under its task field name (the user's own names stay too)."""
    if not columns:
        return row
    out = dict(row)
    for field, column in columns.items():
        out.pop(field, None)  # an unmapped column that happens to share the field's name must not win
        if column in row:
            out[field] = row[column]
    return out


def _flatten_instruction(row: Record, where: str) -> Record:
    """`{"instruction"?, "input": {...}, "output": {...} or JSON text}` → one flat record; other rows unchanged."""
    if not isinstance(row.get("input"), dict) or "output" not in row:
        return row
    output = row["output"]
    if isinstance(output, str):
        try:
            output = json.loads(output)
        except json.JSONDecodeError:
            raise InputError(f"{where}: field 'output' is neither an object nor JSON text of one") from None
    if not isinstance(output, dict):
        raise InputError(f"{where}: field 'output' must be an object of answer fields, got {type(output).__name__}")
    rest = {k: v for k, v in row.items() if k not in ("input", "output", "instruction")}
    return {**rest, **row["input"], **output}


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="ignore").lstrip(_BOM + " \t\r\n")
    return head.startswith("[")


def _json_array_rows(path: Path) -> Iterator[tuple[str, Record]]:
    if path.stat().st_size > MAX_JSON_ARRAY_BYTES:
        raise InputError(f"{path}: a JSON array over {MAX_JSON_ARRAY_BYTES >> 30} GiB; write one object per line "
                         "(JSONL) instead")
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}")
        yield where, item


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Record]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{where}: line longer than {MAX_LINE_BYTES >> 20} MiB (a binary file, or "
                                 f"records without line breaks?)")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"{where}: not valid UTF-8") from None
            if number == 1:
                line = line.lstrip(_BOM)
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                detail = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"
                raise InputError(f"{where}: malformed JSON ({detail} column {exc.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def sniff_delimiter(path: Path) -> str:
    """The separator of a CSV file among `,` `;` and tab: the one that splits every one of the first lines into the
    header's count of columns (more than one; the csv module parses, so quoted separators and line breaks count
    right). Excel writes `;` where the decimal mark is a comma. When no separator fits every line (a malformed row
    further down), the one that splits the header widest is taken and the row's own error follows. Raises
    InputError when two fit equally well."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        sample = [line for _, line in zip(range(_SNIFF_LINES), handle)]
    fitting, widths = [], {}
    for candidate in DELIMITERS:
        rows = [row for row in csv.reader(sample, delimiter=candidate) if row]
        if len(sample) == _SNIFF_LINES and len(rows) > 1:
            rows = rows[:-1]  # the sample may end inside a quoted field
        widths[candidate] = len(rows[0]) if rows else 0
        if widths[candidate] > 1 and all(len(row) == widths[candidate] for row in rows):
            fitting.append(candidate)
    if not fitting:
        widest = max(widths.values(), default=0)
        fitting = [d for d, width in widths.items() if width == widest and width > 1] or [","]
    if len(fitting) == 1:
        return fitting[0]
    names = " and ".join(repr(d) for d in fitting)
    raise InputError(f"{path}: ambiguous CSV separator: both {names} split every line into the same columns; set "
                     "data.csv_delimiter")


def _check_header(path: Path, header: list[str], columns: dict[str, str]) -> None:
    missing = [(field, column) for field, column in columns.items() if column not in header]
    if missing:
        field, column = missing[0]
        raise InputError(f"data.columns.{field}: column '{column}' is not in {path} (its columns: "
                         f"{', '.join(header)})")


def _csv_rows(path: Path, delimiter: str | None, columns: dict[str, str]) -> Iterator[tuple[str, Record]]:
    csv.field_size_limit(MAX_LINE_BYTES)
    reader = None
    try:
        delimiter = delimiter or sniff_delimiter(path)
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark that would otherwise join the first header.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            _check_header(path, header, columns)
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise InputError(f"{where}: more values than the {len(header)} header columns")
                yield where, row
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8 (from Excel, save as 'CSV UTF-8')") from None
    except csv.Error as exc:
        line = reader.line_num + 1 if reader is not None else 1  # the line being read when it failed
        raise InputError(f"{path}:{line}: malformed CSV ({exc})") from None


def _parquet_rows(path: Path, columns: dict[str, str]) -> Iterator[tuple[str, Record]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file; all mean "unreadable"
        raise InputError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:120]})") from None
    _check_header(path, file.schema_arrow.names, columns)
    number = 0
    for batch in file.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", row
