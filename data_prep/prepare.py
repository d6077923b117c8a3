"""`multitune prep`: records → tokenized Arrow shards + manifest, once per content hash (a second call is a
cache hit)."""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from multitune.compat import single_threaded_tokenizers
from multitune.data_prep.cache import PreparedData, build_cached, file_sha256
from multitune.data_prep.chat_encoding import chat_encoder
from multitune.data_prep.shards import SCHEMA, ShardWriter, list_column
from multitune.data_prep.tasks import ChatTask, Record
from multitune.data_prep.tokenize import IGNORE, TokenizedBatch, labelled, tokenize_examples, tokenizer_fingerprint
from multitune.recipes.errors import InputError, RunStopped
from multitune.recipes.schema import DataConfig

log = logging.getLogger(__name__)

# 2: shards carry an index (lengths.npy, batches.npy); 3: control strings in data are text, truncation cuts
# the prompt, labels in the manifest
PREP_VERSION = "3"
CHUNK_ROWS = 2048
SPLITS = ("train", "eval")
# Reading and validating cost this process ~70 µs a row and a worker ~450 (measured, support tickets): past ~6
# workers this process is the bottleneck, and each more worker only adds its ~225 MB. An explicit
# data.prep_workers may go higher.
MAX_DEFAULT_WORKERS = 8


def cache_key(task: ChatTask, data: DataConfig, tokenizer, generated: list[Record] | None = None) -> str:
    """Hash of everything that changes the shards: inputs' content, tokenizer + template, formatter, prep settings.

    Generated data is hashed by content, not by generator settings, so a changed generator never hits a stale cache.
    """
    if generated is not None:
        content = hashlib.sha256(json.dumps(generated, sort_keys=True, default=str).encode()).hexdigest()
        source = {"generated": content, "n_train": data.generator.n_train}
    else:
        source = {"train_file": file_sha256(data.train_file),
                  "eval_file": file_sha256(data.eval_file) if data.eval_file else None,
                  "eval_fraction": data.eval_fraction, "columns": data.columns, "csv_delimiter": data.csv_delimiter}
    key = {
        "prep_version": PREP_VERSION, "task": task.name, "formatter_version": task.formatter_version,
        "source": source, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_len": data.max_seq_len,
        "overlong": data.overlong, "completion_only": data.completion_only,
        "task_options": data.task_options.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def prepare(task: ChatTask, data: DataConfig, tokenizer) -> PreparedData:
    """Shards of the recipe's data (a cache hit when the content hash exists). Tasks with closed label sets get them
    first: declared in the recipe, the generator's taxonomy, or collected in a first reading pass over the training
    split; they are part of the prompt, recorded in the manifest (`PreparedData.labels`). Raises InputError for bad
    rows (file:line) and for a split left empty (naming why)."""
    generated = None
    if data.generator is not None:  # cheap (milliseconds per thousand records) and needed for the key
        generated = task.generate(data.generator.n_train + data.generator.n_eval, data.generator.seed)
    key = cache_key(task, data, tokenizer, generated)

    def build(tmp: Path) -> dict:
        started = time.perf_counter()
        labelled = _with_labels(task, data, generated)
        writers = {split: _SplitWriter(tmp / split) for split in SPLITS}
        unseen = _UnseenLabels(labelled)
        try:
            chunks = _chunks(unseen.counted(_labelled_records(labelled, data, generated)), CHUNK_ROWS)
            for encoded in _encoded(chunks, labelled, data, tokenizer, tmp):
                for split, writer in writers.items():
                    writer.add(encoded[split])
        finally:
            for writer in writers.values():
                writer.close()
        splits = {split: writer.stats() for split, writer in writers.items()}
        for split, stats in splits.items():
            if stats["rows"] == 0:
                raise InputError(_empty_split_message(split, stats, data))
        unseen.warn()
        return {
            "task": task.name, "formatter_version": task.formatter_version,
            "max_seq_len": data.max_seq_len, "overlong": data.overlong, "completion_only": data.completion_only,
            "labels": labelled.labels, "unseen_labels": unseen.counts,
            "splits": splits, "seconds": round(time.perf_counter() - started, 3),
        }

    return build_cached(Path(data.cache_dir), key, build)


def _with_labels(task: ChatTask, data: DataConfig, generated: list[Record] | None) -> ChatTask:
    """The task with its label sets: as configured (declared), the generator's taxonomy, or collected in a first
    reading pass over the training split (rows validated there already, so a bad row fails before anything is
    written)."""
    if not task.needs_labels():
        return task
    labels = task.generator_labels() if generated is not None else None
    if labels is None:
        seen = {"train": 0, "eval": 0}

        def train_records() -> Iterator[Record]:
            for split, record in _labelled_records(task, data, generated):
                seen[split] += 1
                if split == "train":
                    yield record

        labels = task.collect_labels(train_records())
        if not seen["train"]:
            raise InputError(_empty_split_message("train", {"dropped": 0}, data))
    return task.with_labels(labels)


def _empty_split_message(split: str, stats: dict, data: DataConfig) -> str:
    if stats["dropped"]:
        return (f"data: the {split} split is empty after preparation ({stats['dropped']} rows dropped as longer than "
                f"data.max_seq_len={data.max_seq_len})")
    if split == "eval" and data.eval_file is not None:
        return f"data: the eval split is empty: data.eval_file {data.eval_file} has no rows"
    if data.train_file is not None and data.eval_file is None:
        return (f"data: the {split} split is empty: {data.train_file} has too few rows to hold out "
                f"data.eval_fraction={data.eval_fraction} and keep rows to train on; add rows or give data.eval_file")
    return f"data: the {split} split is empty"


class _UnseenLabels:
    """Counts eval rows whose labels the task never saw in training (collected label sets only: declared ones
    refuse such rows), and says so in one warning line."""

    def __init__(self, task: ChatTask):
        self.task, self.counts = task, {}

    def counted(self, rows: Iterator[tuple[str, Record]]) -> Iterator[tuple[str, Record]]:
        for split, record in rows:
            if split == "eval":
                count_unseen(self.task, record, self.counts)
            yield split, record

    def warn(self) -> None:
        if self.counts:
            log.warning("data: %s", describe_unseen(self.counts, "eval rows", "counted, scored as they are"))


def count_unseen(task: ChatTask, record: Record, counts: dict[str, dict[str, int]]) -> None:
    """Add `record`'s labels outside the task's label sets to `counts` (field → value → rows)."""
    for field, value in task.unseen_labels(record):
        counts.setdefault(field, {}).setdefault(value, 0)
        counts[field][value] += 1


def describe_unseen(counts: dict[str, dict[str, int]], rows: str, consequence: str) -> str:
    """One line: `3 eval rows have labels never seen in training (<consequence>): category 'Drucker' (2), ...`;
    `rows` names the rows in the plural ("eval rows")."""
    total = sum(n for values in counts.values() for n in values.values())
    named = ", ".join(f"{field} {value!r} ({n})" for field, values in counts.items() for value, n in values.items())
    if total == 1:
        return f"1 of the {rows} has a label never seen in training ({consequence}): {named}"
    return f"{total} {rows} have labels never seen in training ({consequence}): {named}"


def _labelled_records(task: ChatTask, data: DataConfig, generated: list[Record] | None) -> Iterator[tuple[str, Record]]:
    """(split, record) pairs in one streaming pass: user files are never held in memory whole. The held-out split is
    a seeded draw of data.eval_fraction; should it draw no row at all (a file of a few dozen rows), the last row is
    held out, so a small file never gets an empty eval split silently."""
    if generated is not None:
        for index, record in enumerate(generated):
            yield ("train" if index < data.generator.n_train else "eval"), record
        return
    read = {"columns": data.columns, "delimiter": data.csv_delimiter}
    if data.eval_file is not None:
        yield from (("train", r) for r in task.read(data.train_file, **read))
        yield from (("eval", r) for r in task.read(data.eval_file, **read))
        return
    rng = random.Random(0)  # seeded hold-out, stable across runs
    held_out = 0
    previous = None
    for record in task.read(data.train_file, **read):
        if previous is not None:
            yield previous
        split = "eval" if rng.random() < data.eval_fraction else "train"
        held_out += split == "eval"
        previous = (split, record)
    if previous is not None:
        yield ("eval" if held_out == 0 else previous[0]), previous[1]


@dataclass
class _Encoded:
    """One chunk's rows of one split with the overlong policy applied: a record batch ready to write (None when no
    row is left) and what happened to the rows."""

    batch: pa.RecordBatch | None
    counts: dict[str, int]


def _encoded(chunks: Iterator[list[tuple[str, Record]]], task: ChatTask, data: DataConfig, tokenizer,
             tmp: Path) -> Iterator[dict[str, _Encoded]]:
    """Each chunk encoded (split → `_Encoded`), in input order, so the shards are identical whatever the worker count.

    The first chunk is encoded here; only data longer than that starts worker processes, since starting them costs
    seconds. Rendering, tokenizing and building the columns (~95% of prep time) happen one chunk per worker and come
    back as Arrow buffers; this process only reads, validates and writes, so it does no per-token Python work. At
    most two chunks per worker are in flight, so memory does not grow with the data.
    """
    workers = data.prep_workers or min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS)
    first = next(chunks, None)
    if first is None:
        return
    yield _encode_chunk(first, task, data, tokenizer)
    second = next(chunks, None)
    if second is None:
        return
    chunks = itertools.chain([second], chunks)
    tokenizer_folder = _tokenizer_for_workers(tokenizer, tmp / ".tokenizer") if workers > 1 else None
    if tokenizer_folder is None:
        for chunk in chunks:
            yield _encode_chunk(chunk, task, data, tokenizer)
        return
    # Spawned, not forked: forking after torch and the tokenizer's thread pool are loaded is unsafe. Workers get the
    # tokenizer as a folder, not as an object: a pickled tokenizer is bigger than a pipe's buffer, so starting each
    # worker would block this process until that worker had imported transformers (measured: 20 s for 2 workers).
    # A pool of concurrent.futures, not multiprocessing.Pool: a worker killed by the OOM killer breaks it at once
    # instead of hanging forever.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(task, data, type(tokenizer), str(tokenizer_folder)))
    try:
        pending: deque = deque(pool.submit(_encode_in_worker, chunk) for chunk in itertools.islice(chunks, 2 * workers))
        while pending:
            encoded = pending.popleft().result()
            pending.extend(pool.submit(_encode_in_worker, chunk) for chunk in itertools.islice(chunks, 1))
            yield encoded
    except BrokenProcessPool:
        raise RunStopped(f"data prep: a worker process died (killed for memory?); nothing was written; set "
                         f"data.prep_workers lower (it was {workers})") from None
    finally:
        pool.shutdown(cancel_futures=True)
        shutil.rmtree(tokenizer_folder, ignore_errors=True)


def _tokenizer_for_workers(tokenizer, folder: Path) -> Path | None:
    """`folder` with the tokenizer saved in it, if a worker can rebuild the same tokenizer from it: its class importable
    by name and the reloaded tokenizer's fingerprint equal. Else None, with a warning: prep then runs in this process
    (e.g. a tokenizer class from remote code or defined at run time)."""
    cls = type(tokenizer)
    try:
        if getattr(importlib.import_module(cls.__module__), cls.__qualname__, None) is not cls:
            raise ImportError(f"{cls.__module__}.{cls.__qualname__} cannot be imported by name")
        tokenizer.save_pretrained(folder)
        if tokenizer_fingerprint(cls.from_pretrained(folder)) != tokenizer_fingerprint(tokenizer):
            raise ValueError("the tokenizer reloaded from its saved files differs")
    except Exception as error:  # noqa: BLE001 - any failure means "not transferable"; reported, never fatal
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("data prep runs in one process: the tokenizer cannot be handed to worker processes (%s: %s)",
                    type(error).__name__, error)
        return None
    return folder


def _encode_chunk(chunk: list[tuple[str, Record]], task: ChatTask, data: DataConfig, tokenizer) -> dict[str, _Encoded]:
    records = [record for _, record in chunk]
    examples = [task.format(record) for record in records]
    batch = tokenize_examples(tokenizer, examples, data.completion_only)
    cut = [0] * len(records)  # prompt tokens cut per row by truncation; None: dropped
    for i, row in enumerate(batch.input_ids):
        if len(row) > data.max_seq_len:
            cut[i] = None if data.overlong == "drop" else _truncate(tokenizer, examples[i], data, batch, i)
    return {split: _encode_split(data, [i for i, (name, _) in enumerate(chunk) if name == split], records, batch, cut,
                                 keep_records=split == "eval")
            for split in SPLITS}


def _truncate(tokenizer, example, data: DataConfig, batch: TokenizedBatch, i: int) -> int | None:
    """Row `i` of `batch` replaced by the example with its user text cut to fit `data.max_seq_len` (system prompt,
    template markers and the whole answer with its end-of-turn kept); the prompt tokens cut, or None when the
    answer alone does not fit."""
    result = chat_encoder(tokenizer).encode_truncated(example.messages, example.answer, data.max_seq_len)
    if result is None:
        return None
    encoded, removed = result
    batch.input_ids[i], batch.labels[i] = labelled(encoded.prompt_ids, encoded.completion_ids, data.completion_only)
    batch.prompt_lengths[i] = len(encoded.prompt_ids)
    return removed


def _encode_split(data: DataConfig, picked: list[int], records: list[Record], batch: TokenizedBatch,
                  cut: list[int | None], keep_records: bool) -> _Encoded:
    """Rows `picked` of a tokenized chunk → shard columns, without the rows the overlong policy dropped (`cut[i]` is
    None) and counting the truncated ones. Labels are rebuilt from prompt lengths with numpy rather than copied per
    token."""
    counts = {"tokens": 0, "target_tokens": 0, "dropped": 0, "truncated": 0, "truncated_tokens": 0}
    ids, prompt_lengths, kept = [], [], []
    for i in picked:
        if cut[i] is None:
            counts["dropped"] += 1
            continue
        if cut[i]:
            counts["truncated"] += 1
            counts["truncated_tokens"] += cut[i]
        ids.append(batch.input_ids[i])
        prompt_lengths.append(batch.prompt_lengths[i])
        kept.append(i)
    if not ids:
        return _Encoded(None, counts)
    input_ids = list_column(ids)
    values = input_ids.values.to_numpy()
    lengths = np.diff(input_ids.offsets.to_numpy())
    prompt = np.asarray(prompt_lengths, dtype=np.int32)
    starts = input_ids.offsets.to_numpy()[:-1]
    labels = values.copy()
    if data.completion_only:
        position = np.arange(len(values)) - np.repeat(starts, lengths)
        labels[position < np.repeat(prompt, lengths)] = IGNORE
    is_target = labels != IGNORE
    is_target[starts[lengths > 0]] = False  # a row's first token is never predicted
    counts["tokens"] = int(lengths.sum())
    counts["target_tokens"] = int(is_target.sum())
    record_json = [json.dumps(records[i], ensure_ascii=False, default=str) for i in kept] if keep_records else None
    columns = {
        "input_ids": input_ids,
        "labels": pa.ListArray.from_arrays(input_ids.offsets, pa.array(labels)),
        "length": pa.array(lengths.astype(np.int32)),
        "prompt_length": pa.array(prompt),
        "record": pa.array(record_json if record_json is not None else [None] * len(ids), pa.string()),
    }
    return _Encoded(pa.record_batch([columns[field.name] for field in SCHEMA], schema=SCHEMA), counts)


_WORKER: tuple | None = None


def _start_worker(task: ChatTask, data: DataConfig, tokenizer_class: type, tokenizer_folder: str) -> None:
    global _WORKER
    single_threaded_tokenizers()
    # The class itself rather than AutoTokenizer, which imports the model's config and modeling code (5 s of start-up).
    _WORKER = (task, data, tokenizer_class.from_pretrained(tokenizer_folder))


def _encode_in_worker(chunk: list[tuple[str, Record]]) -> dict[str, _Encoded]:
    return _encode_chunk(chunk, *_WORKER)


class _SplitWriter:
    """Writes one split's encoded chunks to shards and adds up what happened to its rows."""

    def __init__(self, folder: Path):
        self.writer = ShardWriter(folder)
        self.histogram: dict[int, int] = {}
        self.totals = {"rows": 0, "tokens": 0, "target_tokens": 0, "dropped": 0, "truncated": 0,
                       "truncated_tokens": 0}

    def add(self, encoded: _Encoded) -> None:
        for name, count in encoded.counts.items():
            self.totals[name] += count
        if encoded.batch is None:
            return
        self.writer.write_batch(encoded.batch)
        lengths = encoded.batch.column("length").to_numpy()
        buckets = np.left_shift(1, np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64))
        for bucket, count in zip(*np.unique(buckets, return_counts=True)):
            self.histogram[int(bucket)] = self.histogram.get(int(bucket), 0) + int(count)

    def close(self) -> None:
        self.writer.close()

    def stats(self) -> dict:
        return {**self.totals, "rows": self.writer.rows, "shards": self.writer.files,
                "length_histogram": {f"<={k}": v for k, v in sorted(self.histogram.items())}}


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
