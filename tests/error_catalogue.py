"""The bad-input catalogue: every input a user can get wrong that we test, and the one-line error it gets.

One source for two things: `tests/test_bad_inputs.py` runs every case, and the table in `docs/errors.md` is this
list rendered (`python tests/error_catalogue.py` prints it; a test fails when the two differ).

A case is `multitune ARGS` with placeholders: `{recipe}` a valid tiny recipe, `{dir}` the case's folder (files
named in `files` are written there first), `{run}` its output_dir, which already holds an earlier run that must
come through untouched.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multitune.data_prep.tasks import get_task  # noqa: E402
from multitune.data_prep.tasks.base import MAX_LINE_BYTES  # noqa: E402
from multitune.data_prep.tasks.ticket_classification.generator import generate_tickets  # noqa: E402


@dataclass(frozen=True)
class BadInput:
    id: str
    kind: str  # recipe | data | events | cli
    given: str  # what the user gave, as the docs show it
    args: tuple[str, ...]
    message: str  # part of the one error line (what the docs show)
    files: dict[str, bytes] = field(default_factory=dict)


def recipe_case(id: str, given: str, overrides: list[str], message: str, command: str = "validate") -> BadInput:
    return BadInput(id, "recipe", given, (command, "{recipe}", *overrides), message)


def recipe_file_case(id: str, given: str, content: bytes, message: str) -> BadInput:
    return BadInput(id, "recipe", given, ("validate", "{dir}/bad.yaml"), message, {"bad.yaml": content})


def data_case(id: str, given: str, content: bytes, message: str, name: str = "bad.jsonl",
              extra: tuple[str, ...] = ()) -> BadInput:
    """`train --overwrite` on the earlier run with this training file: refused before the earlier run is touched."""
    return BadInput(id, "data", given, ("train", "{recipe}", "--overwrite", "data.generator=null",
                                        f"data.train_file={{dir}}/{name}", *extra), message, {name: content})


def declared_case(id: str, given: str, content: bytes, message: str, name: str = "bad.jsonl",
                  extra: tuple[str, ...] = ()) -> BadInput:
    """`data_case` with the generator's taxonomy declared in the recipe (`data.task_options.labels`)."""
    return data_case(id, given, content, message, name, (*extra, f"data.task_options.labels={DECLARED}"))


# The synthetic taxonomy, declared as a team would in its recipe (flow-style YAML on the command line).
DECLARED = json.dumps(get_task("ticket_classification").generator_labels())
GERMAN_COLUMNS = ("data.columns={title: Betreff, description: Text, category: Kategorie, subcategory: "
                  "Unterkategorie, urgency: Dringlichkeit}",)


EVENT_RECIPE_BASE = ("task=process_monitoring", "model.name_or_path=lstm", "adapter.kind=none",
                     "process.backbone=lstm")
EVENT_RECIPE = (*EVENT_RECIPE_BASE, "process.columns.categorical=[org:resource]",
                "process.columns.continuous=[case:Amount]", "data.generator=null")
EVENT_HEADER = "case:concept:name,concept:name,time:timestamp,org:resource,case:Amount\n"


def event_case(id: str, given: str, content: bytes, message: str, name: str = "log.csv") -> BadInput:
    """`train --overwrite` of a process-monitoring recipe (LSTM) on this event log: refused before output_dir."""
    return BadInput(id, "events", given, ("train", "{recipe}", "--overwrite", *EVENT_RECIPE,
                                          f"data.train_file={{dir}}/{name}"), message, {name: content})


def cli_case(id: str, given: str, args: tuple[str, ...], message: str, files: dict[str, bytes] | None = None):
    return BadInput(id, "cli", given, args, message, files or {})


TICKETS = generate_tickets(3, seed=0)
SWEEP = b"""name: s
program: recipes/debug/tiny_ticket_qlora.yaml
method: grid
parameters:
  train.lr: {values: [0.001]}
"""


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def ticket(**changes) -> dict:
    return {**TICKETS[0], "id": "T-x", **changes}


def csv_rows(*lines: str) -> bytes:
    return ("title,description,category,subcategory,urgency\n" + "".join(line + "\n" for line in lines)).encode()


# An adapter folder whose base has moved away since training (multitune.json records where it was).
MOVED_BASE = "/nonexistent/models/tiny"
ADAPTER_FILES = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "base_model_name_or_path": MOVED_BASE}).encode(),
    "adapter_model.safetensors": b"never read",
    "multitune.json": json.dumps({"base_model": MOVED_BASE}).encode(),
}


def adapter(folder: str, **replace: bytes) -> dict[str, bytes]:
    return {f"{folder}/{name}": content for name, content in {**ADAPTER_FILES, **replace}.items()}


def tokenizer_files(chat_template: str) -> dict[str, bytes]:
    """A 300-token byte-level BPE tokenizer folder (tok/) with this chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator([str(t) for t in TICKETS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "chat_template": chat_template}
    return {"tok/tokenizer.json": bpe.to_str().encode(), "tok/tokenizer_config.json": json.dumps(config).encode()}


def gguf_bytes(architecture: str) -> bytes:
    """A small, whole GGUF file of this architecture (one float tensor), written with the gguf package."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        writer = gguf.GGUFWriter(path, architecture)
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((64, 8), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def gguf_case(id: str, given: str, content: bytes | None, message: str) -> BadInput:
    """`prep` with `model.name_or_path` a .gguf file: refused before any conversion is written."""
    return BadInput(id, "recipe", given, ("prep", "{recipe}", "model.name_or_path={dir}/model.gguf",
                                          "model.cache_dir={dir}/models"), message,
                    {} if content is None else {"model.gguf": content})


VALID_RECIPE = b"task: ticket_classification\noutput_dir: runs/x\nmodel: {name_or_path: m}\ndata: {generator: {}}\n"

CASES: list[BadInput] = [
    # --- recipes: typos, wrong types, out-of-range values -------------------------------------------------------
    recipe_case("recipe-typo-key", "`train.lrr=1e-4` (typo)", ["train.lrr=1e-4"],
                "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    recipe_case("recipe-typo-section", "`modle.dtype=float32` (misspelt section)", ["modle.dtype=float32"],
                "unknown key 'modle' (did you mean 'model'?)"),
    recipe_case("recipe-type-number", "`train.lr=fast`", ["train.lr=fast"],
                "train.lr: Input should be a valid number, unable to parse string as a number (got 'fast')"),
    recipe_case("recipe-type-bool", "`data.packing=maybe`", ["data.packing=maybe"],
                "data.packing: Input should be a valid boolean"),
    recipe_case("recipe-type-list", "`adapter.target_modules=5`", ["adapter.target_modules=5"],
                "adapter.target_modules"),
    recipe_case("recipe-type-section", "`train: 3` (a value where a section goes)", ["train=3"],
                "train: Input should be a valid dictionary or instance of TrainConfig"),
    recipe_case("recipe-range-dropout", "`adapter.dropout=1.5`", ["adapter.dropout=1.5"],
                "adapter.dropout: Input should be less than 1 (got 1.5)"),
    recipe_case("recipe-range-steps", "`train.max_steps=0`", ["train.max_steps=0"],
                "train.max_steps: Input should be greater than 0 (got 0)"),
    recipe_case("recipe-range-warmup", "`train.warmup_steps=-1`", ["train.warmup_steps=-1"],
                "train.warmup_steps: Input should be greater than or equal to 0 (got -1)"),
    recipe_case("recipe-range-fraction", "`data.eval_fraction=1.5`", ["data.eval_fraction=1.5"],
                "data.eval_fraction: Input should be less than 1 (got 1.5)"),
    recipe_case("recipe-range-keep", "`checkpoint.keep_last=0`", ["checkpoint.keep_last=0"],
                "checkpoint.keep_last: Input should be greater than 0 (got 0)"),
    recipe_case("recipe-range-timeout", "`distributed.timeout_s=0`", ["distributed.timeout_s=0"],
                "distributed.timeout_s: Input should be greater than 0 (got 0)"),
    recipe_case("recipe-choice-quant", "`model.quantization=int3`", ["model.quantization=int3"],
                "model.quantization: Input should be 'none' or 'nf4' (got 'int3')"),
    recipe_case("recipe-choice-dtype", "`model.dtype=fp8`", ["model.dtype=fp8"],
                "model.dtype: Input should be 'float32', 'bfloat16' or 'float16' (got 'fp8')"),
    recipe_case("recipe-choice-strategy", "`distributed.strategy=horovod`", ["distributed.strategy=horovod"],
                "distributed.strategy: Input should be 'single', 'ddp', 'fsdp', 'zero2' or 'zero3'"),
    recipe_case("recipe-choice-nonfinite", "`train.nonfinite=ignore`", ["train.nonfinite=ignore"],
                "train.nonfinite: Input should be 'stop' or 'skip' (got 'ignore')"),
    recipe_case("recipe-choice-tiny-arch", "`model.tiny.arch=gpt2`", ["model.tiny.arch=gpt2"],
                "model.tiny.arch: Input should be 'llama' or 'qwen2' (got 'gpt2')"),
    recipe_case("recipe-unknown-task", "`task=poetry`", ["task=poetry"],
                "unknown task 'poetry' (known: chat_jsonl, it_ticket_extraction"),
    recipe_case("recipe-task-options", "`data.task_options.json_fields=[a]` on a task that does not read it",
                ["data.task_options.json_fields=[a]"],
                "data.task_options.json_fields: task ticket_classification does not take this option (it takes "
                "labels, system_prompt)"),
    recipe_case("recipe-columns-unknown-field", "`data.columns` with a typo in a task field's name",
                ["data.columns={descripton: Beschreibung}"],
                "data.columns.descripton: not a field of task ticket_classification (did you mean 'description'?)"),
    recipe_case("recipe-labels-shape", "`data.task_options.labels` with `category` as a plain list",
                ["data.task_options.labels={category: [a, b], urgency: [hoch]}"],
                "data.task_options.labels.category: must map each category to a non-empty list of its subcategories"),
    recipe_case("recipe-columns-events", "`data.columns` on process monitoring (its columns are `process.columns`)",
                [*EVENT_RECIPE_BASE, "data.columns={case: Fall}"],
                "data.columns: process_monitoring names its event-log columns in process.columns"),
    # --- recipes: impossible combinations -----------------------------------------------------------------------
    recipe_case("combo-4bit-full", "`model.quantization=nf4` with `adapter.kind=none`",
                ["model.quantization=nf4", "adapter.kind=none"],
                "model.quantization=nf4 needs adapter.kind=lora: 4-bit weights cannot be fully fine-tuned"),
    recipe_case("combo-4bit-sharded", "NF4 under `fsdp` with `model.quant_storage=uint8`",
                ["model.quantization=nf4", "distributed.strategy=fsdp"],
                "model.quant_storage=uint8 cannot be sharded by fsdp: set model.quant_storage=float32"),
    recipe_case("combo-seq-len", "`data.max_seq_len=4096` with `train.micro_batch_tokens=1024`",
                ["data.max_seq_len=4096", "train.micro_batch_tokens=1024"],
                "data.max_seq_len (4096) exceeds train.micro_batch_tokens (1024)"),
    recipe_case("combo-two-sources", "`data.train_file` and `data.generator` both set", ["data.train_file=a.jsonl"],
                "give exactly one of data.train_file or data.generator"),
    recipe_case("combo-group-packed", "`data.group_by_length=true` with packing on",
                ["data.group_by_length=true"],
                "data.group_by_length groups unpacked samples: set data.packing: false with it"),
    recipe_case("combo-compile-sharded", "`train.compile=true` under `zero3`",
                ["train.compile=true", "distributed.strategy=zero3"],
                "train.compile is supported under distributed.strategy=single or ddp, not zero3: set train.compile: "
                "false"),
    recipe_case("combo-eval-file", "`data.eval_file` with `data.generator`", ["data.eval_file=e.jsonl"],
                "data.eval_file goes with data.train_file, not with data.generator"),
    recipe_case("combo-offload-zero3", "`distributed.offload_params=true` under `zero3`",
                ["distributed.offload_params=true", "distributed.strategy=zero3"],
                "distributed.offload_params is FSDP2's CPU offload; under distributed.strategy=zero3 use "
                "accelerate_configs/zero3_offload.yaml with strategy=zero3"),
    recipe_case("combo-skip-deepspeed", "`train.nonfinite=skip` under `zero3`",
                ["train.nonfinite=skip", "distributed.strategy=zero3"],
                "train.nonfinite=skip cannot be honoured under distributed.strategy=zero3"),
    # --- recipes: what they point at ------------------------------------------------------------------------------
    recipe_case("recipe-model-missing", "`model.name_or_path=./no/such/model`", ["model.name_or_path=./no/such/model"],
                "model.name_or_path: folder not found: ./no/such/model", command="prep"),
    recipe_case("recipe-accelerate-missing", "`distributed.accelerate_config=nope.yaml` (no such file)",
                ["distributed.strategy=ddp", "distributed.accelerate_config=nope.yaml"],
                "distributed.accelerate_config: file not found: nope.yaml"),
    recipe_case("recipe-accelerate-mismatch", "`distributed.strategy=fsdp` with the DDP accelerate config",
                ["distributed.strategy=fsdp", "distributed.accelerate_config=accelerate_configs/ddp.yaml"],
                "accelerate_configs/ddp.yaml: distributed_type MULTI_GPU, but distributed.strategy=fsdp needs FSDP"),
    # --- recipe files -----------------------------------------------------------------------------------------------
    BadInput("recipe-file-missing", "recipe", "a recipe path that does not exist", ("validate", "{dir}/nope.yaml"),
             "recipe file not found"),
    recipe_file_case("recipe-file-yaml", "`task: [unclosed`", b"task: [unclosed\n", "bad.yaml: not valid YAML"),
    recipe_file_case("recipe-file-list", "a YAML list instead of sections", b"- task\n- model\n",
                     "a recipe must be a mapping of sections, got list"),
    recipe_file_case("recipe-file-empty", "an empty recipe file", b"",
                     "a recipe must be a mapping of sections, got NoneType"),
    recipe_file_case("recipe-file-latin1", "a recipe saved as Latin-1 (not UTF-8)",
                     VALID_RECIPE.replace(b"runs/x", "runs/caf\xe9".encode("latin-1")),
                     "bad.yaml: not valid YAML: 'utf-8' codec can't decode byte 0xe9"),
    recipe_file_case("recipe-file-python-tag", "`!!python/object/apply:os.system [...]` (code in YAML)",
                     VALID_RECIPE + b"x: !!python/object/apply:os.system ['touch pwned']\n",
                     "not valid YAML: could not determine a constructor for the tag"),
    recipe_file_case("recipe-file-no-task", "a recipe without `task`", VALID_RECIPE.replace(
        b"task: ticket_classification\n", b""), "missing required key 'task'"),
    # --- data files ----------------------------------------------------------------------------------------------
    data_case("data-malformed-json", "a JSONL row cut short", jsonl(TICKETS[0], '{"title": "x", "description'),
              "bad.jsonl:2: malformed JSON (Unterminated string starting at column 16)"),
    data_case("data-not-object", "a JSONL row that is a list", jsonl(TICKETS[0], '["a", "b"]'),
              "bad.jsonl:2: expected a JSON object, got list"),
    data_case("data-missing-field", "a row without `description`",
              jsonl(TICKETS[0], {k: v for k, v in ticket().items() if k != "description"}),
              "bad.jsonl:2: missing field 'description'"),
    data_case("data-blank-field", "a row whose `title` is blank", jsonl(ticket(title="  ")),
              "bad.jsonl:1: missing field 'title'"),
    declared_case("data-label-category", "`category: sales`, outside the declared taxonomy",
                  jsonl(ticket(category="sales")), "bad.jsonl:1: field 'category' must be one of"),
    declared_case("data-label-subcategory", "`subcategory` of another category than declared",
                  jsonl(ticket(category="billing", subcategory="bug")),
                  "bad.jsonl:1: field 'subcategory' must be one of refund|invoice"),
    declared_case("data-label-urgency", "`urgency: asap`, not a declared urgency", jsonl(ticket(urgency="asap")),
                  "bad.jsonl:1: field 'urgency' must be one of"),
    declared_case("data-label-mapped", "a declared taxonomy broken in an Excel CSV with `data.columns`",
                  "\ufeffBetreff;Text;Kategorie;Unterkategorie;Dringlichkeit\r\nDrucker;leer;Hardware;Toner;"
                  "hoch\r\n".encode(),
                  "bad.csv:2: field 'category' (column 'Kategorie') must be one of billing|account|technical|"
                  "shipping|product|unrelated (got 'Hardware')", name="bad.csv", extra=GERMAN_COLUMNS),
    data_case("data-column-missing", "`data.columns` naming a column the CSV does not have",
              b"Betreff;Beschreibung\r\nx;y\r\n",
              "data.columns.description: column 'Text' is not in", name="bad.csv", extra=GERMAN_COLUMNS),
    data_case("data-csv-ambiguous", "a CSV that `,` and `;` both split evenly (say which: `data.csv_delimiter`)",
              b"title;description,category;subcategory\nt;d,billing;refund\n",
              "bad.csv: ambiguous CSV separator: both ',' and ';' split every line into the same columns; set "
              "data.csv_delimiter", name="bad.csv"),
    data_case("data-json-not-objects", "a `.json` array of strings", b'["a ticket", "another"]\n',
              "bad.json[0]: expected a JSON object, got str", name="bad.json"),
    data_case("data-instruction-output", "an instruction row whose `output` is plain text",
              jsonl({"input": {"title": "t", "description": "d"}, "output": "billing"}),
              "bad.jsonl:1: field 'output' is neither an object nor JSON text of one"),
    data_case("data-empty", "an empty file", b"", "bad.jsonl: no records in the file (empty)"),
    data_case("data-blank-lines", "a file of blank lines", b"\n  \n\n", "bad.jsonl: no records in the file (empty)"),
    data_case("data-latin1", "a JSONL file in Latin-1", jsonl(TICKETS[0]) + '{"title": "caf\xe9"}\n'.encode("latin-1"),
              "bad.jsonl:2: not valid UTF-8"),
    data_case("data-huge-line", f"one line over {MAX_LINE_BYTES >> 20} MiB",
              jsonl(TICKETS[0]) + b'{"title": "' + b"x" * MAX_LINE_BYTES + b'"}\n',
              f"bad.jsonl:2: line longer than {MAX_LINE_BYTES >> 20} MiB"),
    data_case("data-duplicate-id", "two rows with the same `id`", jsonl(ticket(), TICKETS[1], ticket()),
              "bad.jsonl:3: duplicate id 'T-x' (first at line 1)"),
    data_case("data-extension", "`tickets.txt` (not CSV, JSONL, JSON or Parquet)", jsonl(TICKETS[0]),
              "tickets.txt: unsupported data file type '.txt' (use .csv, .tsv, .jsonl, .json or .parquet)",
              name="tickets.txt"),
    BadInput("data-missing-file", "data", "`data.train_file` that does not exist",
             ("train", "{recipe}", "--overwrite", "data.generator=null", "data.train_file={dir}/nowhere.jsonl"),
             "data file not found"),
    data_case("data-csv-missing-column", "a CSV without the `urgency` column",
              b"title,description,category,subcategory\nt,d,billing,refund\n", "bad.csv:2: missing field 'urgency'",
              name="bad.csv"),
    data_case("data-csv-extra-values", "a CSV row with more values than columns",
              csv_rows("t,d,billing,refund,low,EXTRA"), "bad.csv:2: more values than the 5 header columns",
              name="bad.csv"),
    data_case("data-csv-quoting", "a CSV field with text after its closing quote",
              csv_rows('"t"x,d,billing,refund,low'),
              "bad.csv:2: malformed CSV (',' expected after '\"')", name="bad.csv"),
    data_case("data-csv-latin1", "a CSV in Latin-1",
              csv_rows("caf\xe9,d,billing,refund,low").decode().encode("latin-1"),
              "bad.csv: not valid UTF-8 (from Excel, save as 'CSV UTF-8')", name="bad.csv"),
    BadInput("data-eval-file", "data", "a malformed row in `data.eval_file`",
             ("train", "{recipe}", "--overwrite", "data.generator=null", "data.train_file={dir}/train.jsonl",
              "data.eval_file={dir}/eval.jsonl"), "eval.jsonl:1: malformed JSON",
             {"train.jsonl": jsonl(*TICKETS), "eval.jsonl": b"{oops\n"}),
    BadInput("data-all-too-long", "data", "every sample longer than `data.max_seq_len=32`",
             ("train", "{recipe}", "--overwrite", "data.max_seq_len=32"),
             "data: the train split is empty after preparation (200 rows dropped as longer than data.max_seq_len=32)"),
    # --- event logs (process monitoring) --------------------------------------------------------------------------
    event_case("events-missing-column", "an event log without the case id column",
               b"case,concept:name,time:timestamp,org:resource,case:Amount\nc1,A,2024-01-01T10:00:00,r1,5\n",
               "log.csv: missing column 'case:concept:name'"),
    event_case("events-bad-timestamp", "an unparsable timestamp",
               (EVENT_HEADER + "c1,A,2024-01-01T10:00:00,r1,5\nc1,B,yesterday,r2,5\n").encode(),
               "log.csv: column 'time:timestamp' row 3: unparsable timestamp ('yesterday')"),
    event_case("events-nan-feature", "NaN in a continuous feature",
               (EVENT_HEADER + "c1,A,2024-01-01T10:00:00,r1,5\nc1,B,2024-01-01T11:00:00,r2,nan\n").encode(),
               "log.csv: column 'case:Amount' row 3: not a finite number ('nan')"),
    event_case("events-missing-activity", "an event without an activity",
               (EVENT_HEADER + "c1,A,2024-01-01T10:00:00,r1,5\nc1,,2024-01-01T11:00:00,r2,5\n").encode(),
               "log.csv: column 'concept:name' row 3: missing value"),
    event_case("events-empty", "an event log with a header and no events", EVENT_HEADER.encode(),
               "log.csv: the event log has no events"),
    event_case("events-file-type", "an event log as `.txt`", b"whatever\n",
               "log.txt: unsupported event log type (use .csv, .parquet, .xes or .xes.gz)", name="log.txt"),
    # --- GGUF models (converted on first use) --------------------------------------------------------------------
    gguf_case("gguf-missing", "`model.name_or_path: model.gguf` that does not exist", None,
              "model.name_or_path: GGUF file not found"),
    gguf_case("gguf-not-gguf", "a `.gguf` that is not GGUF", b"<html>404</html>\n",
              "is not a whole, readable GGUF file (cut short, or not GGUF: GGUF magic invalid)"),
    gguf_case("gguf-truncated", "a `.gguf` cut short (interrupted download)", gguf_bytes("llama")[:-300],
              "is not a whole, readable GGUF file (cut short"),
    gguf_case("gguf-architecture", "a `.gguf` of an architecture transformers cannot read (rwkv6)",
              gguf_bytes("rwkv6"), "GGUF architecture 'rwkv6' is not supported by transformers' GGUF reader"),
    # --- command line -----------------------------------------------------------------------------------------------
    cli_case("cli-no-command", "`multitune` with no command", (), "the following arguments are required: command"),
    cli_case("cli-unknown-command", "`multitune trian R.yaml`", ("trian", "{recipe}"), "invalid choice: 'trian'"),
    cli_case("cli-unknown-flag", "`train R.yaml --resume-from 4`", ("train", "{recipe}", "--resume-from", "4"),
             "unrecognized arguments: --resume-from 4"),
    cli_case("cli-missing-flag", "`infer` without `--input`", ("infer", "{recipe}", "--output", "{dir}/o.jsonl"),
             "the following arguments are required: --input"),
    cli_case("cli-bad-int", "`--num_processes two`", ("train", "{recipe}", "--num_processes", "two"),
             "argument --num_processes: invalid int value: 'two'"),
    cli_case("cli-override-form", "`train.lr` (an override without `=`)", ("validate", "{recipe}", "train.lr"),
             "override 'train.lr' is not of the form key.sub=value"),
    cli_case("cli-override-into-value", "`task.name=x` (a key under a plain value)",
             ("validate", "{recipe}", "task.name=x"), "override 'task.name=x': 'task' is not a section"),
    cli_case("cli-resume-overwrite", "`--resume --overwrite` together",
             ("train", "{recipe}", "--resume", "--overwrite"),
             "--resume and --overwrite exclude each other"),
    cli_case("cli-existing-run", "`train` into an output_dir that holds a run", ("train", "{recipe}"),
             "already holds a run (log.jsonl, metrics.json, adapter, checkpoints): pass --resume"),
    cli_case("cli-resume-half-written", "`--resume` when the only checkpoint is half-written",
             ("train", "{recipe}", "--resume"), "no complete checkpoint to resume from"),
    cli_case("cli-no-base", "`eval --no-base` with nothing else", ("eval", "{recipe}", "--no-base"),
             "--no-base leaves nothing to evaluate"),
    cli_case("cli-endpoint-half", "`eval --endpoint URL` without `--endpoint-model`",
             ("eval", "{recipe}", "--endpoint", "http://127.0.0.1:9/v1"),
             "--endpoint and --endpoint-model go together: give both"),
    cli_case("cli-merge-not-adapter", "`merge --adapter` a folder that is no adapter",
             ("merge", "--adapter", "{dir}", "--out", "{dir}/merged"),
             "not an adapter folder (no adapter_config.json)"),
    cli_case("cli-merge-pickle-adapter", "`merge --adapter` with weights only in pickled `adapter_model.bin`",
             ("merge", "--adapter", "{dir}/pickled", "--out", "{dir}/merged"), "no adapter_model.safetensors",
             {"pickled/adapter_config.json": b"{}", "pickled/adapter_model.bin": b"not opened"}),
    cli_case("cli-merge-base-moved", "`merge` of an adapter whose base folder has moved since training",
             ("merge", "--adapter", "{dir}/adapter", "--out", "{dir}/merged"),
             f"its base model {MOVED_BASE} is not there (the adapter was trained on {MOVED_BASE}); if it moved, "
             "point at it with --base PATH", adapter("adapter")),
    cli_case("cli-merge-base-not-a-model", "`merge --base` a folder that holds no model",
             ("merge", "--adapter", "{dir}/adapter", "--base", "{dir}/adapter", "--out", "{dir}/merged"),
             "error: multitune merge: OSError: ", adapter("adapter")),  # "... does not appear to have a file named ..."
    cli_case("cli-merge-bad-record", "`merge` of an adapter whose `multitune.json` is not JSON",
             ("merge", "--adapter", "{dir}/adapter", "--out", "{dir}/merged"),
             "multitune.json: cannot be read (Expecting property name enclosed in double quotes",
             adapter("adapter", **{"multitune.json": b"{oops"})),
    cli_case("cli-serve-base-moved", "`serve --adapter` whose base has moved",
             ("serve", "--adapter", "{dir}/adapter", "--port", "0"),
             f"its base model {MOVED_BASE} is not there (the adapter was trained on {MOVED_BASE}); if it moved, "
             "point at it with the MODEL argument", adapter("adapter")),
    cli_case("cli-serve-nothing", "`serve` with neither a model nor an adapter", ("serve",),
             "multitune serve: give the base MODEL, an --adapter, or both"),
    cli_case("cli-serve-relative-base", "`serve cache/models/x` from a folder where that path does not exist",
             ("serve", "cache/models/x-not-here"), "folder not found: cache/models/x-not-here"),
    cli_case("cli-serve-key-env-unset", "`serve --api-key-env VAR` with VAR not set",
             ("serve", "{dir}/model", "--api-key-env", "MT_CATALOGUE_UNSET_KEY"),
             "--api-key-env MT_CATALOGUE_UNSET_KEY: the variable is not set (export MT_CATALOGUE_UNSET_KEY=KEY)"),
    cli_case("cli-serve-empty-key", "`serve --api-key ''`", ("serve", "{dir}/model", "--api-key", ""),
             "--api-key: the key is empty"),
    cli_case("cli-serve-two-keys", "`serve --api-key K --api-key-env VAR` (two keys)",
             ("serve", "{dir}/model", "--api-key", "k", "--api-key-env", "VAR"),
             "argument --api-key-env: not allowed with argument --api-key"),
    cli_case("cli-serve-max-tokens", "`serve --max-tokens 0`", ("serve", "{dir}/model", "--max-tokens", "0"),
             "--max-tokens 0 is out of range (at least 1)"),
    cli_case("cli-serve-body-limit", "`serve --max-body-bytes 0`", ("serve", "{dir}/model", "--max-body-bytes", "0"),
             "--max-body-bytes 0 is out of range (at least 1)"),
    cli_case("cli-serve-timeout", "`serve --timeout 0`", ("serve", "{dir}/model", "--timeout", "0"),
             "--timeout 0 is out of range (more than 0 seconds)"),
    cli_case("cli-infer-output-folder", "`infer --output` an existing folder",
             ("infer", "{recipe}", "task=rca_generation", "--input", "{dir}/rows.jsonl", "--output", "{dir}"),
             "is a folder; give the path of a .jsonl file to write",
             {"rows.jsonl": b'{"description": "disk full"}\n'}),
    cli_case("cli-infer-no-weights", "`infer` with a model folder holding a tokenizer but no weights",
             ("infer", "{recipe}", "task=rca_generation", "--input", "{dir}/rows.jsonl", "--output", "{dir}/o.jsonl"),
             "error: multitune infer: ValueError: Unrecognized model in",
             {"rows.jsonl": b'{"description": "disk full"}\n'}),
    cli_case("cli-eval-adapter-moved-base", "`eval --adapter` whose recorded base is not the recipe's model",
             ("eval", "{recipe}", "--no-base", "--adapter", "{dir}/adapter", "model.name_or_path=/nonexistent/m"),
             "its base model /nonexistent/m is not there (the adapter was trained on /nonexistent/models/tiny); "
             "if it moved, point at it with model.name_or_path=PATH", adapter("adapter")),
    cli_case("cli-results-bad-metrics", "`results` over a run whose `metrics.json` is cut short",
             ("results", "{dir}/runs"), "metrics.json: cannot be read (Expecting property name",
             {"runs/a/recipe.resolved.yaml": b"task: x\n", "runs/a/metrics.json": b"{oops"}),
    cli_case("cli-results-bad-recipe", "`results` over a run whose `recipe.resolved.yaml` is not YAML",
             ("results", "{dir}/runs"), "recipe.resolved.yaml: cannot be read (while parsing a flow sequence",
             {"runs/a/recipe.resolved.yaml": b"task: [x\n", "runs/a/metrics.json": b"{}"}),
    cli_case("cli-template-refuses", "a model whose chat template cannot render a user turn (`validate`)",
             ("validate", "{recipe}", "model.name_or_path={dir}/tok"),
             "the tokenizer's chat template cannot render a single user message: Only tool calls are supported",
             tokenizer_files("{{ raise_exception('Only tool calls are supported') }}")),
    cli_case("cli-export-name", "`export --gguf model.bin` (not a .gguf name)",
             ("export", "--adapter", "{dir}", "--gguf", "{dir}/model.bin"), "the file name must end in .gguf"),
    cli_case("cli-export-not-adapter", "`export --adapter` a folder that is no adapter",
             ("export", "--adapter", "{dir}", "--gguf", "{dir}/model.gguf"), "not an adapter folder"),
    cli_case("cli-export-type", "`export --type q4_k` (a type not written)",
             ("export", "--adapter", "{dir}", "--gguf", "{dir}/model.gguf", "--type", "q4_k"),
             "argument --type: invalid choice: 'q4_k'"),
    cli_case("cli-tiny-model-exists", "`tiny-model --out` an existing folder", ("tiny-model", "--out", "{dir}"),
             "already exists"),
    cli_case("cli-slurm-time", "`slurm --time 1:2:3:4`", ("slurm", "{recipe}", "--time", "1:2:3:4"),
             "--time '1:2:3:4': expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]"),
    cli_case("cli-slurm-ranks", "`slurm --tasks-per-node 2` on a `single` recipe",
             ("slurm", "{recipe}", "--tasks-per-node", "2"),
             "--nodes 1 x 2 tasks per node start 2 ranks, but distributed.strategy=single"),
    cli_case("cli-sweep-array-cpus", "`sweep run --slurm --cpus-per-task 0`",
             ("sweep", "run", "{dir}/sweep.yaml", "--local", "--slurm", "--cpus-per-task", "0"),
             "--cpus-per-task 0 is out of range (at least 1)", {"sweep.yaml": SWEEP}),
]


def render_table() -> str:
    """The docs/errors.md table: one row per case."""
    rows = ["| id | input | error (one line, exit code 2) |", "|---|---|---|"]
    for case in CASES:
        message = case.message.replace("|", "\\|")  # a pipe inside a table cell, even in code, needs escaping
        rows.append(f"| `{case.id}` | {case.given} | `{message}` |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_table(), end="")
