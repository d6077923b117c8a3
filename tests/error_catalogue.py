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

from data_prep.tasks.base import MAX_LINE_BYTES  # noqa: E402
from data_prep.tasks.ticket_classification.generator import generate_tickets  # noqa: E402


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


def data_case(id: str, given: str, content: bytes, message: str, name: str = "bad.jsonl") -> BadInput:
    """`train --overwrite` on the earlier run with this training file: refused before the earlier run is touched."""
    return BadInput(id, "data", given, ("train", "{recipe}", "--overwrite", "data.generator=null",
                                        f"data.train_file={{dir}}/{name}"), message, {name: content})


EVENT_RECIPE = ("task=process_monitoring", "model.name_or_path=lstm", "adapter.kind=none", "process.backbone=lstm",
                "process.columns.categorical=[org:resource]", "process.columns.continuous=[case:Amount]",
                "data.generator=null")
EVENT_HEADER = "case:concept:name,concept:name,time:timestamp,org:resource,case:Amount\n"


def event_case(id: str, given: str, content: bytes, message: str, name: str = "log.csv") -> BadInput:
    """`train --overwrite` of a process-monitoring recipe (LSTM) on this event log: refused before output_dir."""
    return BadInput(id, "events", given, ("train", "{recipe}", "--overwrite", *EVENT_RECIPE,
                                          f"data.train_file={{dir}}/{name}"), message, {name: content})


def cli_case(id: str, given: str, args: tuple[str, ...], message: str, files: dict[str, bytes] | None = None):
    return BadInput(id, "cli", given, args, message, files or {})


TICKETS = generate_tickets(3, seed=0)


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def ticket(**changes) -> dict:
    return {**TICKETS[0], "id": "T-x", **changes}


def csv_rows(*lines: str) -> bytes:
    return ("title,description,category,subcategory,urgency\n" + "".join(line + "\n" for line in lines)).encode()


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
    recipe_case("recipe-task-options", "`data.task_options.json_fields=[a]` on a task without options",
                ["data.task_options.json_fields=[a]"],
                "data.task_options: task ticket_classification takes no options"),
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
    recipe_case("combo-eval-file", "`data.eval_file` with `data.generator`", ["data.eval_file=e.jsonl"],
                "data.eval_file goes with data.train_file, not with data.generator"),
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
    data_case("data-label-category", "`category: sales` (not in the taxonomy)", jsonl(ticket(category="sales")),
              "bad.jsonl:1: field 'category' must be one of"),
    data_case("data-label-subcategory", "`subcategory` of another category",
              jsonl(ticket(category="billing", subcategory="bug")),
              "bad.jsonl:1: field 'subcategory' must be one of refund|invoice"),
    data_case("data-label-urgency", "`urgency: asap`", jsonl(ticket(urgency="asap")),
              "bad.jsonl:1: field 'urgency' must be one of"),
    data_case("data-empty", "an empty file", b"", "bad.jsonl: no records in the file (empty)"),
    data_case("data-blank-lines", "a file of blank lines", b"\n  \n\n", "bad.jsonl: no records in the file (empty)"),
    data_case("data-latin1", "a JSONL file in Latin-1", jsonl(TICKETS[0]) + '{"title": "caf\xe9"}\n'.encode("latin-1"),
              "bad.jsonl:2: not valid UTF-8"),
    data_case("data-huge-line", f"one line over {MAX_LINE_BYTES >> 20} MiB",
              jsonl(TICKETS[0]) + b'{"title": "' + b"x" * MAX_LINE_BYTES + b'"}\n',
              f"bad.jsonl:2: line longer than {MAX_LINE_BYTES >> 20} MiB"),
    data_case("data-duplicate-id", "two rows with the same `id`", jsonl(ticket(), TICKETS[1], ticket()),
              "bad.jsonl:3: duplicate id 'T-x' (first at line 1)"),
    data_case("data-extension", "`tickets.txt` (not JSONL or CSV)", jsonl(TICKETS[0]),
              "tickets.txt: unsupported data file type '.txt' (use .jsonl or .csv)", name="tickets.txt"),
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
              "bad.csv: not valid UTF-8", name="bad.csv"),
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
    cli_case("cli-export-name", "`export --gguf model.bin` (not a .gguf name)",
             ("export", "--adapter", "{dir}", "--gguf", "{dir}/model.bin"), "the file name must end in .gguf"),
    cli_case("cli-export-not-adapter", "`export --adapter` a folder that is no adapter",
             ("export", "--adapter", "{dir}", "--gguf", "{dir}/model.gguf"), "not an adapter folder"),
    cli_case("cli-export-type", "`export --type q4_k` (a type not written)",
             ("export", "--adapter", "{dir}", "--gguf", "{dir}/model.gguf", "--type", "q4_k"),
             "argument --type: invalid choice: 'q4_k'"),
    cli_case("cli-tiny-model-exists", "`tiny-model --out` an existing folder", ("tiny-model", "--out", "{dir}"),
             "already exists"),
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
