"""Recipe schema and loader: valid recipes load, overrides apply, bad recipes fail with one precise line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from multitune.recipes.errors import InputError
from multitune.recipes.loader import load_recipe, validate_recipe

pytestmark = pytest.mark.unit

BASE = {"task": "ticket_classification", "output_dir": "runs/x", "model": {"name_or_path": "m"},
        "data": {"generator": {}}}


def with_(section: str, **values) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def error_of(raw: dict) -> str:
    with pytest.raises(InputError) as info:
        validate_recipe(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_fill_in():
    recipe = validate_recipe(BASE)
    assert recipe.train.scheduler == "cosine" and recipe.adapter.kind == "lora"
    assert recipe.distributed.strategy == "single"


def test_unknown_key_suggests_the_closest():
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in error_of(with_("train", lrr=1e-4))
    assert "unknown key 'modle'" in error_of({**BASE, "modle": {}})
    assert "did you mean 'model'" in error_of({**BASE, "modle": {}})


def test_wrong_type_names_the_field_and_value():
    message = error_of(with_("train", lr="fast"))
    assert "train.lr" in message and "'fast'" in message


def test_out_of_range_and_literal_values():
    assert "adapter.dropout" in error_of(with_("adapter", dropout=1.5))
    assert "model.quantization" in error_of(with_("model", name_or_path="m", quantization="int3"))


def test_missing_required_key():
    raw = dict(BASE)
    del raw["task"]
    assert "missing required key 'task'" in error_of(raw)


@pytest.mark.parametrize("raw, fragment", [
    (with_("adapter", kind="none") | {"model": {"name_or_path": "m", "quantization": "nf4"}},
     "needs adapter.kind=lora"),
    ({**BASE, "model": {"name_or_path": "m", "quantization": "nf4", "quant_storage": "uint8"},
      "distributed": {"strategy": "fsdp"}}, "cannot be sharded by fsdp"),
    ({**BASE, "model": {"name_or_path": "m", "quantization": "nf4", "quant_storage": "uint8"},
      "distributed": {"strategy": "zero3"}}, "cannot be sharded by zero3"),
    (with_("data", generator={}, max_seq_len=4096) | {"train": {"micro_batch_tokens": 1024}},
     "exceeds train.micro_batch_tokens"),
    (with_("data", train_file="a.jsonl"), "exactly one of data.train_file or data.generator"),
])
def test_invalid_combinations_are_rejected(raw, fragment):
    assert fragment in error_of(raw)


def test_qlora_under_fsdp_with_float_storage_is_fine():
    recipe = validate_recipe({**BASE, "model": {"name_or_path": "m", "quantization": "nf4", "dtype": "bfloat16",
                                                "quant_storage": "bfloat16"}, "distributed": {"strategy": "fsdp"}})
    assert recipe.model.quant_storage == "bfloat16"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    recipe = load_recipe(path, ["train.lr=3e-4", "data.packing=false", "adapter.target_modules=[q_proj,v_proj]",
                                "train.max_steps=7"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.data.packing is False
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.max_steps == 7


def test_bad_override_and_bad_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(InputError, match="not of the form key.sub=value"):
        load_recipe(path, ["train.lr"])
    with pytest.raises(InputError, match="unknown key 'train.l'"):
        load_recipe(path, ["train.l=1"])
    path.write_text("task: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "sweeps"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path: Path):
    from multitune.data_prep.tasks import get_task

    recipe = load_recipe(path)
    get_task(recipe.task)


def test_every_schema_key_is_documented():
    """docs/recipes.md stays true: every key of every section appears as a table row."""
    from multitune.recipes.loader import _section_type
    from multitune.recipes.schema import Recipe

    doc = (REPO / "docs" / "recipes.md").read_text()
    missing = []
    for name, field in Recipe.model_fields.items():
        section = _section_type(field.annotation)
        for key in (section.model_fields if section is not None else [name]):
            if f"| `{key}` |" not in doc:
                missing.append(f"{name}.{key}" if section is not None else name)
    assert not missing, f"undocumented recipe keys: {missing}"
