"""Event logs from CSV, Parquet, XES (or skpm's BPI loaders) into one validated table: a row per event, cases in
order. Bad logs fail with one line naming the file, column and row.

Events out of time order within a case are sorted (stably, so equal timestamps keep their file order) with a
warning rather than refused: exports of real logs are often grouped by case but not sorted, and the order in time
is what the process did.
"""

from __future__ import annotations

import gzip
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

from multitune.recipes.errors import InputError
from multitune.recipes.schema import EventColumns

log = logging.getLogger(__name__)


def read_event_log(path: str | Path, columns: EventColumns) -> pd.DataFrame:
    """The log at `path` (.csv, .parquet, .xes, .xes.gz), checked and ordered (see `check_events`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"event log not found: {path}")
    name = path.name.lower()
    if name.endswith(".csv"):
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"{path}: not a readable CSV ({' '.join(str(exc).split())})") from None
        first_row = 2  # after the header line
    elif name.endswith(".parquet"):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
        first_row = 1
    elif name.endswith((".xes", ".xes.gz")):
        frame = read_xes(path)
        first_row = 1
    else:
        raise InputError(f"{path}: unsupported event log type (use .csv, .parquet, .xes or .xes.gz)")
    return check_events(frame, columns, str(path), first_row)


def read_skpm(log_class: str, cache_dir: Path, columns: EventColumns) -> pd.DataFrame:
    """A BPI log through skpm (downloaded from 4TU once, or read from `<cache_dir>/<LogClass>/<LogClass>.parquet`)."""
    try:
        from skpm import event_logs
    except ImportError:
        raise InputError(f"process.skpm_log={log_class}: skpm is not installed (pip install skpm), or download the "
                         "log yourself and give data.train_file instead") from None
    loader = getattr(event_logs, log_class, None)
    if loader is None:
        raise InputError(f"process.skpm_log: skpm has no event log {log_class!r}")
    try:
        frame = loader(root_folder=str(cache_dir)).dataframe
    except OSError as exc:
        raise InputError(f"process.skpm_log={log_class}: could not load it ({exc}); without network, place the "
                         f"file at {cache_dir}/{log_class}/{log_class}.parquet or give data.train_file") from None
    return check_events(frame, columns, f"skpm {log_class}", 1)


def read_xes(path: Path) -> pd.DataFrame:
    """XES → table, streaming (iterparse): trace attributes become `case:<key>` columns, event attributes keep
    their keys; values stay strings until `check_events` parses them. Nested (list) attributes are skipped."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    rows: list[dict[str, str]] = []
    trace: dict[str, str] = {}
    event_attrs: dict[str, str] = {}
    stack: list[str] = []
    try:
        with opener(path, "rb") as handle:
            for kind, element in ET.iterparse(handle, events=("start", "end")):
                tag = element.tag.rsplit("}", 1)[-1]
                if kind == "start":
                    stack.append(tag)
                    if tag == "trace":
                        trace = {}
                    elif tag == "event":
                        event_attrs = {}
                    continue
                stack.pop()
                parent = stack[-1] if stack else ""
                key, value = element.get("key"), element.get("value")
                if tag == "event":
                    rows.append({**trace, **event_attrs})
                    element.clear()
                elif tag == "trace":
                    element.clear()
                elif key is not None and value is not None:
                    if parent == "event":
                        event_attrs[key] = value
                    elif parent == "trace":
                        trace[f"case:{key}"] = value
    except ET.ParseError as exc:
        raise InputError(f"{path}: not valid XES/XML ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    return pd.DataFrame(rows, dtype=object)


def check_events(frame: pd.DataFrame, columns: EventColumns, source: str, first_row: int) -> pd.DataFrame:
    """Columns present, timestamps parsable, features without NaN; events ordered by time within each case.

    Returns a table with exactly the mapped columns: case (str), activity (str), timestamp (UTC), the categorical
    attributes (str) and the continuous ones (float64), events of a case contiguous, cases in order of first event.
    """
    wanted = [columns.case, columns.activity, columns.timestamp, *columns.categorical, *columns.continuous]
    missing = [name for name in dict.fromkeys(wanted) if name not in frame.columns]
    if missing:
        raise InputError(f"{source}: missing column '{missing[0]}' (columns: {', '.join(map(str, frame.columns))})")
    frame = frame[list(dict.fromkeys(wanted))].reset_index(drop=True)
    if frame.empty:
        raise InputError(f"{source}: the event log has no events")
    if columns.fill_missing is not None:
        for name in columns.categorical:
            frame[name] = frame[name].where(~_missing(frame[name]), columns.fill_missing)
    for name in (columns.case, columns.activity, *columns.categorical):
        empty = _missing(frame[name])
        if empty.any():
            hint = "" if name in (columns.case, columns.activity) else " (or set process.columns.fill_missing)"
            raise InputError(f"{source}: column '{name}' row {int(np.argmax(empty)) + first_row}: missing value{hint}")
        frame[name] = frame[name].astype(str)
    frame[columns.timestamp] = _timestamps(frame[columns.timestamp], source, columns.timestamp, first_row)
    for name in columns.continuous:
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(f"{source}: column '{name}' row {row + first_row}: not a finite number "
                             f"({frame[name].iloc[row]!r})")
        frame[name] = values.astype(float)
    return _order_cases(frame, columns, source)


def _missing(series: pd.Series) -> np.ndarray:
    return series.isna().to_numpy() | (series.astype(str).str.strip() == "").to_numpy()


def _timestamps(series: pd.Series, source: str, name: str, first_row: int) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(series):
        parsed = series
    else:
        # ISO 8601 (XES, most exports) parses vectorised; only what it misses goes through per-value inference.
        parsed = pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601")
        retry = parsed.isna() & series.notna()
        if retry.any():
            parsed[retry] = pd.to_datetime(series[retry], errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{source}: column '{name}' row {row + first_row}: unparsable timestamp "
                         f"({series.iloc[row]!r})")
    if parsed.dt.tz is None:
        parsed = parsed.dt.tz_localize("UTC")
    return parsed.dt.tz_convert("UTC")


def _order_cases(frame: pd.DataFrame, columns: EventColumns, source: str) -> pd.DataFrame:
    case, ts = columns.case, columns.timestamp
    frame = frame.assign(_row=np.arange(len(frame)))
    ordered = frame.sort_values([case, ts, "_row"], kind="stable")
    moved = ordered.groupby(case, sort=False)["_row"].apply(lambda rows: bool((np.diff(rows.to_numpy()) < 0).any()))
    if moved.any():
        log.warning("%s: events of %d case(s) (first: %s) were not in time order; sorted them by timestamp "
                    "(stable: equal timestamps keep their order in the file)", source, int(moved.sum()),
                    moved[moved].index[0])
    starts = ordered.groupby(case, sort=False)[ts].transform("min")
    ordered = ordered.assign(_start=starts).sort_values(["_start", case, ts, "_row"], kind="stable")
    return ordered.drop(columns=["_row", "_start"]).reset_index(drop=True)
