"""Bad input: every case of the catalogue (tests/error_catalogue.py, the table in docs/errors.md) is refused with one
`error:` line naming the field, file or row, exit code 2, no traceback, the earlier run in output_dir untouched and
no half-written cache; two cases again through a real process; the recipe loader fuzzed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, recipe_dict, write_recipe
from error_catalogue import CASES, BadInput, render_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitune.recipes.errors import InputError


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory) -> Path:
    """A model folder with a 300-token byte-level BPE tokenizer and a chat template: loads in milliseconds where
    the 32k-token Mistral tokenizer of the tiny test model takes ~1 s, and every train/prep case loads one. The
    cases fail before any weights are read."""
    from error_catalogue import TICKETS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator([str(t) for t in TICKETS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    folder = tmp_path_factory.mktemp("small-vocab")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def workspace(tmp_path, small_vocab_model) -> Path:
    """A valid tiny recipe (r.yaml) whose output_dir holds an earlier run with only a half-written checkpoint."""
    # a 300-token vocabulary makes samples long: room for them (only data-all-too-long prepares data)
    write_recipe(tmp_path / "r.yaml", recipe_dict(tmp_path, small_vocab_model, data={"max_seq_len": 2048},
                                                  train={"micro_batch_tokens": 2048}))
    run = tmp_path / "run"
    for name, content in {"log.jsonl": '{"step": 1, "loss": 2.0}\n', "metrics.json": "{}",
                          "adapter/adapter_model.safetensors": "weights",
                          "checkpoints/.step-2.tmp/trainable.safetensors": "half"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(content)
    (tmp_path / "cache").mkdir()
    return tmp_path


def argv(case: BadInput, folder: Path) -> list[str]:
    for name, content in case.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return [a.replace("{recipe}", str(folder / "r.yaml")).replace("{dir}", str(folder)) for a in case.args]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, workspace, capsys, monkeypatch):
    from multitune.launch.cli import main

    monkeypatch.chdir(REPO)  # where accelerate_configs/ resolve from, as for a user in a checkout
    args = argv(case, workspace)
    before = tree_digest(workspace / "run")
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert case.message in errors[0]
    assert tree_digest(workspace / "run") == before
    assert not [p.name for p in (workspace / "cache").iterdir() if p.name.startswith(".")]  # no half-written prep


def test_catalogue_is_large_varied_and_documented():
    kinds = {kind: sum(case.kind == kind for case in CASES) for kind in ("recipe", "data", "events", "cli")}
    assert len({case.id for case in CASES}) == len(CASES) >= 30 and kinds["events"] >= 4, kinds
    assert min(kinds[k] for k in ("recipe", "data", "cli")) >= 10, kinds
    doc = (REPO / "docs" / "errors.md").read_text()
    assert render_table() in doc, "docs/errors.md is out of date: python tests/error_catalogue.py prints the table"
    section = doc.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    documented = {line.split("|")[1].strip(" `") for line in section.splitlines() if line.startswith("| `")}
    assert documented == {case.id for case in CASES}, documented ^ {case.id for case in CASES}


# (a data file through a real `prep` process: tests/test_trainer.py::test_malformed_row_reported_with_file_and_line)
@pytest.mark.parametrize("case_id", ["recipe-file-python-tag", "cli-unknown-flag"])
def test_a_real_process_prints_one_line_and_exits_2(case_id, workspace):
    case = next(case for case in CASES if case.id == case_id)
    before = tree_digest(workspace / "run")
    result = subprocess.run([sys.executable, "-m", "multitune", *argv(case, workspace)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and case.message in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert tree_digest(workspace / "run") == before


# --- the recipe loader, fuzzed ------------------------------------------------------------------------------------

VALID = recipe_dict(Path("/tmp/fuzz"), Path("/tmp/fuzz/model"))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["nf4", "lora", "float32", "ddp", "skip", "all-linear"]))
KEYS = st.one_of(st.text(max_size=10), st.sampled_from(
    ["task", "model", "adapter", "data", "train", "eval", "checkpoint", "tracking", "distributed", "generator",
     "name_or_path", "quantization", "kind", "r", "max_steps", "lr", "strategy", "train_file", "tiny", "arch"]))
TREES = st.recursive(SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                                        st.dictionaries(KEYS, children, max_size=5)), max_leaves=20)


def paths_of(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths_of(value, (*prefix, key))


@st.composite
def mutated_recipes(draw):
    """A valid recipe with a few of its keys replaced, deleted or added."""
    raw = yaml.safe_load(yaml.safe_dump(VALID))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(paths_of(raw))[1:]))
        node = raw
        for key in path[:-1]:
            node = node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del node[path[-1]]
        elif action == "replace":
            node[path[-1]] = draw(TREES)
        elif isinstance(node[path[-1]], dict):
            node[path[-1]][draw(KEYS)] = draw(TREES)
    return raw


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw=st.one_of(mutated_recipes(), st.dictionaries(KEYS, TREES, max_size=6)),
       overrides=st.lists(st.text(max_size=20) | st.builds("{}={}".format, st.sampled_from(
           ["train.lr", "model", "data.generator.seed", "adapter.r", "x.y.z", "task"]), st.text(max_size=8)),
           max_size=3))
def test_loader_raises_only_input_errors(tmp_path_factory, raw, overrides):
    from multitune.recipes.loader import load_recipe

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        recipe = load_recipe(path, overrides)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc).strip()
    else:
        assert recipe.output_dir and recipe.model.name_or_path is not None


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_loader_survives_arbitrary_file_text(tmp_path_factory, text):
    from multitune.recipes.loader import load_recipe

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    with pytest.raises(InputError) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)
