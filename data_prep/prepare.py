"""`multitune prep`: records → tokenized Arrow shards + manifest, once per content hash (a second call is a cache hit)."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.shards import ShardWriter
from data_prep.tasks import Record, Task
from data_prep.tokenize import IGNORE, TokenizedBatch, tokenize_examples, tokenizer_fingerprint
from recipes.errors import InputError
from recipes.schema import DataConfig

PREP_VERSION = "2"  # 2: shards carry an index (lengths.npy, batches.npy)
CHUNK_ROWS = 2048


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    manifest: dict
    cache_hit: bool

    def split(self, name: str) -> Path:
        return self.folder / name


def cache_key(task: Task, data: DataConfig, tokenizer, generated: list[Record] | None = None) -> str:
    """Hash of everything that changes the shards: inputs' content, tokenizer + template, formatter, prep settings.

    Generated data is hashed by content, not by generator settings, so a changed generator never hits a stale cache.
    """
    if generated is not None:
        content = hashlib.sha256(json.dumps(generated, sort_keys=True, default=str).encode()).hexdigest()
        source = {"generated": content, "n_train": data.generator.n_train}
    else:
        source = {"train_file": _file_sha256(data.train_file),
                  "eval_file": _file_sha256(data.eval_file) if data.eval_file else None,
                  "eval_fraction": data.eval_fraction}
    key = {
        "prep_version": PREP_VERSION, "task": task.name, "formatter_version": task.formatter_version,
        "source": source, "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_len": data.max_seq_len,
        "overlong": data.overlong, "completion_only": data.completion_only,
        "task_options": data.task_options.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def prepare(task: Task, data: DataConfig, tokenizer) -> PreparedData:
    generated = None
    if data.generator is not None:  # cheap (milliseconds per thousand records) and needed for the key
        generated = task.generate(data.generator.n_train + data.generator.n_eval, data.generator.seed)
    key = cache_key(task, data, tokenizer, generated)

    def build(tmp: Path) -> dict:
        started = time.perf_counter()
        writers = {split: _SplitWriter(task, data, tokenizer, tmp / split, keep_records=split == "eval")
                   for split in ("train", "eval")}
        try:
            chunks = _chunks(_labelled_records(task, data, generated), CHUNK_ROWS)
            for chunk, batch in _tokenized(chunks, task, tokenizer, data.completion_only, data.prep_workers):
                for split, writer in writers.items():
                    picked = [i for i, (name, _) in enumerate(chunk) if name == split]
                    writer.add([chunk[i][1] for i in picked], batch.select(picked))
        finally:
            for writer in writers.values():
                writer.close()
        splits = {split: writer.stats() for split, writer in writers.items()}
        for split, stats in splits.items():
            if stats["rows"] == 0:
                raise InputError(f"data: the {split} split is empty after preparation ({stats['dropped']} rows "
                                 f"dropped as longer than data.max_seq_len={data.max_seq_len})")
        return {
            "task": task.name, "formatter_version": task.formatter_version,
            "max_seq_len": data.max_seq_len, "overlong": data.overlong, "completion_only": data.completion_only,
            "splits": splits, "seconds": round(time.perf_counter() - started, 3),
        }

    return build_cached(Path(data.cache_dir), key, build)


def build_cached(cache_dir: Path, key: str, build) -> PreparedData:
    """The folder for content hash `key`: reused when complete, else `build(tmp)` writes the splits and returns the
    manifest, and the folder is renamed into place (a crash never leaves a folder that looks complete)."""
    folder = cache_dir / key[:20]
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        return PreparedData(folder, json.loads(manifest_path.read_text()), cache_hit=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        manifest = {"hash": key, **build(tmp)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same key first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = json.loads(manifest_path.read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedData(folder, manifest, cache_hit=False)


def _labelled_records(task: Task, data: DataConfig, generated: list[Record] | None) -> Iterator[tuple[str, Record]]:
    """(split, record) pairs in one streaming pass: user files are never held in memory whole."""
    if generated is not None:
        for index, record in enumerate(generated):
            yield ("train" if index < data.generator.n_train else "eval"), record
    elif data.eval_file is not None:
        yield from (("train", r) for r in task.read(data.train_file))
        yield from (("eval", r) for r in task.read(data.eval_file))
    else:
        rng = random.Random(0)  # seeded hold-out, stable across runs
        yield from ((("eval" if rng.random() < data.eval_fraction else "train"), r) for r in task.read(data.train_file))


def _tokenized(chunks: Iterator[list[tuple[str, Record]]], task: Task, tokenizer, completion_only: bool,
               workers: int) -> Iterator[tuple[list[tuple[str, Record]], TokenizedBatch]]:
    """(chunk, its tokenization) in input order, so the shards are identical whatever the number of workers.

    The first chunk is tokenized here; only data longer than that starts worker processes (spawned: forking after
    torch and the tokenizer's thread pool are loaded is unsafe), since starting them costs seconds. Chat-template
    rendering and tokenization are ~95% of prep time and run one chunk per worker; reading, validating and writing
    stay in this process. At most two chunks per worker are in flight, so memory does not grow with the data.
    """
    workers = workers or os.cpu_count() or 1
    first = next(chunks, None)
    if first is None:
        return
    yield first, _tokenize_chunk(first, task, tokenizer, completion_only)
    if workers == 1:
        for chunk in chunks:
            yield chunk, _tokenize_chunk(chunk, task, tokenizer, completion_only)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(task, tokenizer, completion_only)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_tokenize_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _tokenize_chunk(chunk: list[tuple[str, Record]], task: Task, tokenizer, completion_only: bool) -> TokenizedBatch:
    return tokenize_examples(tokenizer, [task.format(record) for _, record in chunk], completion_only)


_WORKER: tuple | None = None


def _start_worker(task: Task, tokenizer, completion_only: bool) -> None:
    global _WORKER
    # One process per core already: the tokenizer's own thread pool would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (task, tokenizer, completion_only)


def _tokenize_in_worker(chunk: list[tuple[str, Record]]) -> TokenizedBatch:
    return _tokenize_chunk(chunk, *_WORKER)


class _SplitWriter:
    """Applies the overlong policy to tokenized chunks of one split, writes shards, and counts what happened."""

    def __init__(self, task: Task, data: DataConfig, tokenizer, folder: Path, keep_records: bool):
        self.task, self.data, self.tokenizer, self.keep_records = task, data, tokenizer, keep_records
        self.writer = ShardWriter(folder)
        self.histogram: dict[int, int] = {}
        self.totals = {"rows": 0, "tokens": 0, "target_tokens": 0, "dropped": 0, "truncated": 0}

    def add(self, records: list[Record], batch: TokenizedBatch) -> None:
        if not records:
            return
        data, totals = self.data, self.totals
        keep_ids, keep_labels, keep_prompt, keep_json = [], [], [], []
        for ids, labels, prompt_len, record in zip(batch.input_ids, batch.labels, batch.prompt_lengths, records):
            if len(ids) > data.max_seq_len:
                if data.overlong == "drop":
                    totals["dropped"] += 1
                    continue
                ids, labels = ids[:data.max_seq_len], labels[:data.max_seq_len]
                totals["truncated"] += 1
                if all(label == IGNORE for label in labels[1:]):
                    totals["dropped"] += 1  # truncation removed every target token
                    continue
            keep_ids.append(ids)
            keep_labels.append(labels)
            keep_prompt.append(min(prompt_len, len(ids)))
            keep_json.append(json.dumps(record, ensure_ascii=False, default=str))
            totals["tokens"] += len(ids)
            totals["target_tokens"] += sum(label != IGNORE for label in labels[1:])
            bucket = 1 << max(len(ids) - 1, 0).bit_length()
            self.histogram[bucket] = self.histogram.get(bucket, 0) + 1
        self.writer.write(keep_ids, keep_labels, keep_prompt, keep_json if self.keep_records else None)

    def close(self) -> None:
        self.writer.close()

    def stats(self) -> dict:
        return {**self.totals, "rows": self.writer.rows, "shards": self.writer.files,
                "length_histogram": {f"<={k}": v for k, v in sorted(self.histogram.items())}}


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _file_sha256(path: str | None) -> str:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"data file not found: {file}")
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

