"""Event log → per-event features and per-prefix targets → Arrow shards (cached by content hash).

Inputs at event i describe events 0..i only: the activity and categorical attributes of event i, and continuous
time features (log days since case start and since the previous event, weekday, hour) plus numeric attributes,
z-scored with train-split statistics. Targets at event i: the next activity (END after the last event) and the
remaining time until the case's last event. Cases are split by start time: the latest cases are the eval split.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from multitune.data_prep.cache import PreparedData, build_cached
from multitune.data_prep.shards import ShardWriter, list_column
from multitune.recipes.errors import InputError
from multitune.recipes.schema import DataConfig, EventColumns, ProcessConfig

FEATURES_VERSION = "3"  # 2: shards carry an index; 3: columns activity, next_activity (were input_ids, labels)
PAD, UNK, END = "<pad>", "<unk>", "<end>"
TIME_FEATURES = ("log_days_since_start", "log_days_since_previous", "weekday", "hour")
NO_BAYES = -1

SCHEMA = pa.schema([
    ("activity", pa.list_(pa.int32())),        # activity id per event
    ("next_activity", pa.list_(pa.int32())),   # next-activity class per event (END after the last)
    ("length", pa.int32()),
    ("categorical", pa.list_(pa.int32())),     # events x categorical features (activity first), flattened
    ("continuous", pa.list_(pa.float32())),    # events x continuous features, flattened, z-scored
    ("remaining", pa.list_(pa.float32())),     # remaining time / remaining_scale_days
    ("bayes_pred", pa.list_(pa.int32())),      # synthetic logs: the Bayes-optimal next activity, else -1
    ("bayes_prob", pa.list_(pa.float32())),    # its posterior probability
    ("record", pa.string()),                   # the case id
])


@dataclass(frozen=True)
class Vocabulary:
    """Index of each categorical value: 0 padding, 1 unknown (unseen in train); activities also have 2 = END."""

    values: dict[str, list[str]]

    @staticmethod
    def from_train(frame: pd.DataFrame, columns: EventColumns) -> Vocabulary:
        values = {columns.activity: [PAD, UNK, END, *sorted(frame[columns.activity].unique())]}
        for name in columns.categorical:
            values[name] = [PAD, UNK, *sorted(frame[name].unique())]
        return Vocabulary(values)

    def encode(self, name: str, series: pd.Series) -> np.ndarray:
        index = {value: i for i, value in enumerate(self.values[name])}
        return series.map(lambda v: index.get(v, 1)).to_numpy(dtype=np.int32)


def time_features(frame: pd.DataFrame, columns: EventColumns) -> pd.DataFrame:
    """Raw per-event values: days since case start and since the previous event, weekday (Mon=0), hour of day,
    and the targets' ingredients (next activity, remaining days). `frame` is ordered as `check_events` leaves it."""
    ts = frame[columns.timestamp]
    seconds = (ts - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds().to_numpy()
    cases = frame[columns.case]
    grouped = pd.Series(seconds).groupby(cases.to_numpy(), sort=False)
    start = grouped.transform("min").to_numpy()
    end = grouped.transform("max").to_numpy()
    previous = grouped.shift(1).to_numpy()
    next_activity = frame[columns.activity].groupby(cases.to_numpy(), sort=False).shift(-1)
    return pd.DataFrame({
        "days_since_start": (seconds - start) / 86400.0,
        "days_since_previous": np.nan_to_num((seconds - previous) / 86400.0, nan=0.0),
        "weekday": ts.dt.day_of_week.to_numpy(dtype=float),
        "hour": (ts.dt.hour + ts.dt.minute / 60.0).to_numpy(dtype=float),
        "next_activity": next_activity.fillna(END).to_numpy(),
        "remaining_days": (end - seconds) / 86400.0,
    })


def continuous_matrix(frame: pd.DataFrame, times: pd.DataFrame, columns: EventColumns) -> np.ndarray:
    """Unnormalised continuous inputs, events x (TIME_FEATURES + numeric attributes); durations as log1p(days)."""
    parts = [np.log1p(times["days_since_start"]), np.log1p(times["days_since_previous"]), times["weekday"],
             times["hour"], *(frame[name].to_numpy(dtype=float) for name in columns.continuous)]
    return np.stack([np.asarray(p, dtype=np.float64) for p in parts], axis=1)


def split_by_start(frame: pd.DataFrame, columns: EventColumns, eval_cases: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval) by case: the `eval_cases` cases that start last are eval; no case is on both sides."""
    cases = frame[columns.case].unique()  # in order of case start (check_events ordered them)
    if not 0 < eval_cases < len(cases):
        raise InputError(f"data: cannot hold out {eval_cases} of {len(cases)} cases for eval "
                         "(adjust data.eval_fraction or data.generator.n_eval)")
    held_out = set(cases[len(cases) - eval_cases:])
    is_eval = frame[columns.case].isin(held_out).to_numpy()
    return frame[~is_eval].reset_index(drop=True), frame[is_eval].reset_index(drop=True)


def encode_cases(frame: pd.DataFrame, columns: EventColumns, vocab: Vocabulary, mean: np.ndarray,
                 std: np.ndarray, remaining_scale: float, bayes: dict | None) -> dict[str, list]:
    """Columns of SCHEMA (lists per case) for one split."""
    times = time_features(frame, columns)
    continuous = ((continuous_matrix(frame, times, columns) - mean) / std).astype(np.float32)
    categorical = np.stack([vocab.encode(name, frame[name]) for name in (columns.activity, *columns.categorical)],
                           axis=1)
    activity_index = {value: i for i, value in enumerate(vocab.values[columns.activity])}
    next_activity = times["next_activity"].map(lambda v: activity_index.get(v, 1)).to_numpy(dtype=np.int32)
    remaining = (times["remaining_days"].to_numpy() / remaining_scale).astype(np.float32)
    case_ids = frame[columns.case].to_numpy()
    bounds = np.flatnonzero(np.r_[True, case_ids[1:] != case_ids[:-1], True])
    out: dict[str, list] = {name: [] for name in SCHEMA.names}
    for begin, stop in zip(bounds[:-1], bounds[1:]):
        case = str(case_ids[begin])
        out["activity"].append(categorical[begin:stop, 0])
        out["next_activity"].append(next_activity[begin:stop])
        out["categorical"].append(categorical[begin:stop].ravel())
        out["continuous"].append(continuous[begin:stop].ravel())
        out["remaining"].append(remaining[begin:stop])
        if bayes is not None:
            posterior = bayes[case]
            out["bayes_pred"].append(np.array([activity_index.get(a, 1) for a, _ in posterior], dtype=np.int32))
            out["bayes_prob"].append(np.array([p for _, p in posterior], dtype=np.float32))
        else:
            out["bayes_pred"].append(np.full(stop - begin, NO_BAYES, dtype=np.int32))
            out["bayes_prob"].append(np.zeros(stop - begin, dtype=np.float32))
        out["record"].append(case)
    return out


def write_split(folder: Path, cases: dict[str, list], max_len: int, overlong: str) -> dict:
    """Shards of one split; cases longer than `max_len` events are dropped or cut to their first `max_len`."""
    n_cat = len(cases["categorical"][0]) // len(cases["activity"][0])
    n_cont = len(cases["continuous"][0]) // len(cases["activity"][0])
    keep, dropped, truncated = [], 0, 0
    for i, ids in enumerate(cases["activity"]):
        if len(ids) > max_len:
            if overlong == "drop":
                dropped += 1
                continue
            truncated += 1
        keep.append(i)
    width = {"categorical": n_cat, "continuous": n_cont}
    columns = {}
    for name in SCHEMA.names:
        if name in ("length", "record"):
            continue
        per = width.get(name, 1)
        dtype = np.float32 if SCHEMA.field(name).type.value_type == pa.float32() else np.int32
        columns[name] = list_column([cases[name][i][: max_len * per] for i in keep], dtype)
    lengths = [min(len(cases["activity"][i]), max_len) for i in keep]
    columns["length"] = pa.array(lengths, pa.int32())
    columns["record"] = pa.array([cases["record"][i] for i in keep], pa.string())
    writer = ShardWriter(folder, schema=SCHEMA)
    writer.write_columns(columns)
    writer.close()
    return {"rows": writer.rows, "tokens": int(sum(lengths)), "target_tokens": int(sum(lengths)),
            "dropped": dropped, "truncated": truncated, "shards": writer.files}


def prepare_events(frame: pd.DataFrame, data: DataConfig, process: ProcessConfig, source: dict,
                   eval_cases: int, bayes: dict | None = None) -> PreparedData:
    """Split, vocabularies and normalisation from the train split, shards for both splits; cached by content."""
    columns = process.columns
    key_parts = {"features_version": FEATURES_VERSION, "source": source, "columns": columns.model_dump(),
                 "eval_cases": eval_cases, "max_seq_len": data.max_seq_len, "overlong": data.overlong}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()

    def build(tmp: Path) -> dict:
        started = time.perf_counter()
        train, held_out = split_by_start(frame, columns, eval_cases)
        vocab = Vocabulary.from_train(train, columns)
        train_times = time_features(train, columns)
        raw = continuous_matrix(train, train_times, columns)
        mean, std = raw.mean(axis=0), raw.std(axis=0)
        std = np.where(std > 1e-9, std, 1.0)  # a constant feature stays 0 instead of dividing by zero
        remaining_scale = float(train_times["remaining_days"].mean()) or 1.0
        splits = {}
        for name, part in (("train", train), ("eval", held_out)):
            cases = encode_cases(part, columns, vocab, mean, std, remaining_scale, bayes)
            splits[name] = write_split(tmp / name, cases, data.max_seq_len, data.overlong)
            if splits[name]["rows"] == 0:
                raise InputError(f"data: the {name} split is empty after preparation ({splits[name]['dropped']} "
                                 f"cases longer than data.max_seq_len={data.max_seq_len} events dropped)")
        return {
            "task": "process_monitoring", "features_version": FEATURES_VERSION, "splits": splits,
            "categorical": [columns.activity, *columns.categorical], "vocab": vocab.values,
            "continuous": [*TIME_FEATURES, *columns.continuous], "mean": mean.tolist(), "std": std.tolist(),
            "remaining_scale_days": remaining_scale, "synthetic": bayes is not None,
            "train_cases": int(train[columns.case].nunique()), "eval_cases": eval_cases,
            "seconds": round(time.perf_counter() - started, 3),
        }

    return build_cached(Path(data.cache_dir), key, build)


def frame_digest(frame: pd.DataFrame) -> str:
    """Content hash of an event table (for the cache key of logs that do not come from one file)."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes() + json.dumps(list(map(str, frame.columns))).encode()).hexdigest()


def eval_case_count(n_cases: int, fraction: float) -> int:
    return max(1, math.ceil(n_cases * fraction))
