"""Task data → shards: generator, completion-only labels, content-hashed cache, overlong policy, user files."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import numpy as np
import pytest

from multitune.data_prep.chat_encoding import chat_encoder
from multitune.data_prep.prepare import prepare
from multitune.data_prep.shards import ShardedDataset
from multitune.data_prep.tasks import get_task
from multitune.data_prep.tokenize import IGNORE, tokenize_examples
from multitune.recipes.errors import InputError, RunStopped
from multitune.recipes.schema import DataConfig, GeneratorSpec, TaskOptions

pytestmark = pytest.mark.unit

TASK = get_task("ticket_classification")


class KillsItsWorker(type(TASK)):
    """The ticket task, except that formatting the row titled KILL inside a prep worker process kills that process
    with SIGKILL, as the kernel's OOM killer does."""

    def format(self, record):
        if record.get("title") == "KILL" and multiprocessing.parent_process() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().format(record)


def test_generator_is_deterministic_and_varied():
    a, b = TASK.generate(300, seed=5), TASK.generate(300, seed=5)
    assert a == b
    assert TASK.generate(300, seed=6) != a
    descriptions = [r["description"] for r in a]
    assert len(set(descriptions)) / len(descriptions) > 0.95
    assert len({r["title"] for r in a}) > 30
    classes = {(r["category"], r["subcategory"]) for r in a}
    assert len(classes) == 11  # 5 categories x 2 subcategories + unrelated
    assert {r["urgency"] for r in a} == {"high", "medium", "low"}


def test_completion_only_labels_decode_to_exactly_the_answer(tokenizer):
    records = TASK.generate(20, seed=0)
    examples = [TASK.format(r) for r in records]
    batch = tokenize_examples(tokenizer, examples, completion_only=True)
    for ids, labels, prompt_len, example in zip(batch.input_ids, batch.labels, batch.prompt_lengths, examples):
        ids, labels = np.array(ids), np.array(labels)
        assert (labels[:prompt_len] == IGNORE).all()
        assert (labels[prompt_len:] == ids[prompt_len:]).all()
        assert tokenizer.decode(ids[labels != IGNORE], skip_special_tokens=True).strip() == example.answer
        assert ids[-1] == tokenizer.eos_token_id  # the model learns to stop
        # the prompt part is exactly what generation sees at inference time
        prompt = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True)["input_ids"]
        assert list(ids[:prompt_len]) == list(prompt)


def test_full_sequence_labels_when_not_completion_only(tokenizer):
    batch = tokenize_examples(tokenizer, [TASK.format(TASK.generate(1, 0)[0])], completion_only=False)
    assert batch.labels[0] == batch.input_ids[0]


TRICKY_TEXTS = ["", " leading space", "trailing space ", "  two\n\nlines\ttab", "ünïcödé — “quotes” 日本語 🙂",
                "a literal </s> and <s> in the text", "[INST] not a turn [/INST]", "x" * 3000, "12345 67.89 0xDEADBEEF"]


def byte_level_bpe():
    """A GPT-2/Qwen-style byte-level BPE tokenizer (the other common family), trained here in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r) for r in TASK.generate(300, seed=0)] + TRICKY_TEXTS
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|end|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")


def test_chat_encoding_equals_the_templates_own_ids_for_plain_text(tokenizer):
    """Text without control strings gets exactly the ids `apply_chat_template(tokenize=True)` gives, prompt and full
    conversation, for a SentencePiece-style (Mistral, Metaspace) and a byte-level BPE tokenizer (ChatML)."""
    from chat_models import CHATML_TEMPLATE

    bpe = byte_level_bpe()
    bpe.chat_template = CHATML_TEMPLATE
    plain = [t for t in TRICKY_TEXTS if "<" not in t] + [json.dumps(r) for r in TASK.generate(30, seed=9)]
    conversations = [[{"role": "system", "content": s}, {"role": "user", "content": u}]
                     for s in plain[:6] for u in plain]
    answers = [plain[(i * 7) % len(plain)] for i in range(len(conversations))]
    for tok in (tokenizer, bpe):
        encoded = chat_encoder(tok).encode_examples(conversations, answers)
        prompts = chat_encoder(tok).encode_prompts(conversations)
        for conversation, answer, row, prompt in zip(conversations, answers, encoded, prompts):
            assert prompt == row.prompt_ids == tok.apply_chat_template(conversation, add_generation_prompt=True,
                                                                       tokenize=True)["input_ids"]
            full = tok.apply_chat_template([*conversation, {"role": "assistant", "content": answer}],
                                           tokenize=True)["input_ids"]
            assert row.prompt_ids + row.completion_ids == full


def data_config(tmp_path, **kw) -> DataConfig:
    values = {"generator": GeneratorSpec(n_train=50, n_eval=5, seed=0), "cache_dir": str(tmp_path / "cache"),
              "max_seq_len": 512, **kw}
    return DataConfig(**values)


def test_prep_writes_shards_and_manifest_then_hits_cache(tmp_path, tokenizer):
    config = data_config(tmp_path)
    first = prepare(TASK, config, tokenizer)
    assert not first.cache_hit
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 50 and manifest["splits"]["eval"]["rows"] == 5
    assert manifest["splits"]["train"]["dropped"] == 0
    assert sum(manifest["splits"]["train"]["length_histogram"].values()) == 50
    shard = first.folder / "train" / "shard-00000.arrow"
    stamp = shard.stat().st_mtime_ns
    second = prepare(TASK, config, tokenizer)
    assert second.cache_hit and second.folder == first.folder
    assert shard.stat().st_mtime_ns == stamp  # nothing recomputed
    train = ShardedDataset(first.split("train"))
    assert len(train) == 50 and int(train.lengths.sum()) == manifest["splits"]["train"]["tokens"]
    eval_set = ShardedDataset(first.split("eval"))
    assert json.loads(eval_set.record_json(0)) == TASK.generate(55, 0)[50]  # eval = the records after train


def test_cache_key_changes_with_what_changes_tokens(tmp_path, tokenizer):
    base = prepare(TASK, data_config(tmp_path), tokenizer).folder
    assert prepare(TASK, data_config(tmp_path, max_seq_len=400), tokenizer).folder != base
    other_seed = data_config(tmp_path, generator=GeneratorSpec(n_train=50, n_eval=5, seed=1))
    assert prepare(TASK, other_seed, tokenizer).folder != base
    tokenizer_copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_copy.chat_template = tokenizer.chat_template.replace("[INST] ", "[INST]  ")
    assert prepare(TASK, data_config(tmp_path), tokenizer_copy).folder != base


def test_overlong_samples_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    dropped = prepare(TASK, data_config(tmp_path, max_seq_len=200, overlong="drop"), tokenizer).manifest
    stats = dropped["splits"]["train"]
    assert stats["dropped"] > 0 and stats["rows"] + stats["dropped"] == 50 and stats["truncated"] == 0
    truncated = prepare(TASK, data_config(tmp_path, max_seq_len=200, overlong="truncate"), tokenizer)
    stats = truncated.manifest["splits"]["train"]
    assert stats["truncated"] > 0 and stats["rows"] + stats["dropped"] == 50
    assert ShardedDataset(truncated.split("train")).lengths.max() <= 200


def test_everything_dropped_is_an_error(tmp_path, tokenizer):
    with pytest.raises(InputError, match="split is empty"):
        prepare(TASK, data_config(tmp_path, max_seq_len=20), tokenizer)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # nothing half-written
    assert not list((tmp_path / "cache").iterdir())


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_jsonl_and_csv_files(tmp_path, tokenizer):
    records = TASK.generate(40, seed=3)
    jsonl = write_jsonl(tmp_path / "tickets.jsonl", records)
    prepared = prepare(TASK, DataConfig(train_file=str(jsonl), eval_fraction=0.2, cache_dir=str(tmp_path / "c"),
                                        max_seq_len=512), tokenizer)
    splits = prepared.manifest["splits"]
    assert splits["train"]["rows"] + splits["eval"]["rows"] == 40 and splits["eval"]["rows"] > 0
    csv_path = tmp_path / "tickets.csv"
    import csv

    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    assert list(TASK.read(csv_path)) == [{k: str(v) for k, v in r.items()} for r in records]


@pytest.mark.parametrize("line, fragment", [
    ('{"title": "x", "description": "y", "category": "billing", "subcategory": "refund"', "malformed JSON"),
    ('{"title": "x", "category": "billing", "subcategory": "refund", "urgency": "low"}', "missing field 'description'"),
    ('{"title": "x", "description": "y", "category": "sales", "subcategory": "refund", "urgency": "low"}',
     "field 'category' must be one of"),
    ('{"title": "x", "description": "y", "category": "billing", "subcategory": "bug", "urgency": "low"}',
     "field 'subcategory' must be one of refund|invoice"),
    ('{"title": "x", "description": "y", "category": "billing", "subcategory": "refund", "urgency": "asap"}',
     "field 'urgency' must be one of"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, fragment):
    """Label values are checked against a declared taxonomy (here the generator's, declared in the recipe)."""
    declared = TASK.with_options(TaskOptions(labels=TASK.generator_labels()))
    good = TASK.generate(2, seed=0)
    path = write_jsonl(tmp_path / "bad.jsonl", [*good, line])
    with pytest.raises(InputError) as info:
        list(declared.read(path))
    assert f"{path}:3:" in str(info.value) and fragment in str(info.value)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"title": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.jsonl:1: not valid UTF-8"):
        list(TASK.read(path))
    with pytest.raises(InputError, match="data file not found"):
        list(TASK.read(tmp_path / "nope.jsonl"))


def test_empty_user_file_is_an_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.jsonl: no records in the file"):
        prepare(TASK, DataConfig(train_file=str(empty), cache_dir=str(tmp_path / "c")), tokenizer)


@pytest.mark.slow  # worker processes: seconds, not the unit tier's milliseconds
def test_worker_processes_write_the_same_shards_as_one_process(tmp_path, tokenizer):
    """Past the first chunk, prep renders and tokenizes in spawned workers; order and content must not change."""
    from multitune.data_prep.prepare import CHUNK_ROWS

    path = write_jsonl(tmp_path / "tickets.jsonl", TASK.generate(2 * CHUNK_ROWS + 300, seed=4))
    folders = {}
    for workers in (1, 2):
        config = DataConfig(train_file=str(path), eval_fraction=0.1, cache_dir=str(tmp_path / f"c{workers}"),
                            max_seq_len=512, prep_workers=workers)
        folders[workers] = prepare(TASK, config, tokenizer).folder
    for split in ("train", "eval"):
        one, two = ShardedDataset(folders[1] / split), ShardedDataset(folders[2] / split)
        assert len(one) == len(two) > 0
        for i in range(len(one)):
            assert np.array_equal(one.tokens(i), two.tokens(i)) and np.array_equal(one.tokens(i, "labels"),
                                                                                  two.tokens(i, "labels"))
    assert folders[1].name == folders[2].name  # the worker count is not part of the cache key


def test_a_bad_row_in_a_later_chunk_names_its_line_and_writes_nothing(tmp_path, tokenizer):
    from multitune.data_prep.prepare import CHUNK_ROWS

    rows = [*TASK.generate(CHUNK_ROWS + 10, seed=2), '{"title": "x"']
    path = write_jsonl(tmp_path / "tickets.jsonl", rows)
    with pytest.raises(InputError, match=rf"tickets.jsonl:{len(rows)}: malformed JSON"):
        prepare(TASK, DataConfig(train_file=str(path), cache_dir=str(tmp_path / "c"), prep_workers=2), tokenizer)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


@pytest.mark.slow  # worker processes: seconds, not the unit tier's milliseconds
def test_a_killed_prep_worker_stops_prep_in_one_line_and_writes_nothing(tmp_path, tokenizer):
    """multiprocessing.Pool waits forever for a killed worker's result; prep must fail at once instead."""
    from multitune.data_prep.prepare import CHUNK_ROWS

    rows = TASK.generate(2 * CHUNK_ROWS + 10, seed=6)
    rows[-1]["title"] = "KILL"  # in the last chunk, so a worker formats it
    path = write_jsonl(tmp_path / "tickets.jsonl", rows)
    config = DataConfig(train_file=str(path), cache_dir=str(tmp_path / "c"), max_seq_len=512, prep_workers=2)
    with pytest.raises(RunStopped, match=r"worker process died .*data.prep_workers lower \(it was 2\)"):
        prepare(KillsItsWorker(), config, tokenizer)
    assert not list((tmp_path / "c").iterdir())
    assert len(prepare(TASK, config, tokenizer).manifest["splits"]) == 2  # the same data in one piece is fine


@pytest.mark.slow  # worker processes: seconds, not the unit tier's milliseconds
def test_a_tokenizer_workers_cannot_rebuild_is_used_in_one_process(tmp_path, tokenizer, caplog):
    """Workers rebuild the tokenizer from its saved files and its class's import path; a class defined at run time
    (as remote code is) cannot be imported there, so prep warns and stays in this process, with the same shards."""
    from multitune.data_prep.prepare import CHUNK_ROWS

    class RunTimeTokenizer(type(tokenizer)):
        pass

    local = RunTimeTokenizer.from_pretrained(tokenizer.name_or_path)
    path = write_jsonl(tmp_path / "tickets.jsonl", TASK.generate(CHUNK_ROWS + 10, seed=7))
    folders = {}
    for name, tok in (("local", local), ("normal", tokenizer)):
        config = DataConfig(train_file=str(path), cache_dir=str(tmp_path / name), max_seq_len=512, prep_workers=2)
        folders[name] = prepare(TASK, config, tok).folder
    assert "data prep runs in one process" in caplog.text and "RunTimeTokenizer cannot be imported" in caplog.text
    for split in ("train", "eval"):
        a, b = ShardedDataset(folders["local"] / split), ShardedDataset(folders["normal"] / split)
        assert len(a) == len(b) and all(np.array_equal(a.tokens(i), b.tokens(i)) for i in range(len(a)))
    assert not list(folders["normal"].glob(".tokenizer*"))  # the hand-over folder is not left in the cache
