"""Security rules checked on the source (every call, so a new one cannot slip in): YAML only through safe_load, no
pickle, torch.load only with weights_only=True, model weights only from safetensors, adapters only after their
safetensors file is checked, trust_remote_code never hard-wired on. (Behaviour: a pickled adapter and a tampered
checkpoint are refused in test_bad_inputs / test_reliability; no secret in any output file: test_tracking.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

SOURCES = sorted(p for folder in ("launch", "trainer", "data_prep", "recipes", "bench")
                 for p in (REPO / folder).rglob("*.py"))
MODEL_CLASSES = {"AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoPeftModelForCausalLM"}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            yield owner, node.func.attr, node


def keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_calls(path: Path) -> list[str]:
    source = path.read_text()
    found = []
    for owner, attr, call in calls(ast.parse(source)):
        where = f"{path.name}:{call.lineno}"
        if owner == "yaml" and attr in ("load", "load_all", "unsafe_load", "full_load"):
            found.append(f"{where}: yaml.{attr} (use yaml.safe_load)")
        if owner in ("pickle", "dill", "cloudpickle") and attr in ("load", "loads"):
            found.append(f"{where}: {owner}.{attr}")
        if owner == "torch" and attr == "load" and not keyword_is_true(call, "weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        if keyword_is_true(call, "trust_remote_code"):
            found.append(f"{where}: trust_remote_code=True hard-wired")
        if any(k.arg == "safe_serialization" and getattr(k.value, "value", True) is False for k in call.keywords):
            found.append(f"{where}: safe_serialization=False")
        # A GGUF file (gguf_file=...) is a plain tensor container that transformers parses itself: no pickle.
        gguf = any(k.arg == "gguf_file" for k in call.keywords)
        if owner in MODEL_CLASSES and attr == "from_pretrained" and not keyword_is_true(call, "use_safetensors") \
                and not gguf:
            # model.py passes its options as **kwargs, built right above with "use_safetensors": True
            if not (any(k.arg is None for k in call.keywords) and '"use_safetensors": True' in source):
                found.append(f"{where}: {owner}.from_pretrained without use_safetensors=True")
        if owner == "PeftModel" and attr == "from_pretrained" and "check_adapter_folder(" not in source:
            found.append(f"{where}: PeftModel.from_pretrained of an adapter not checked by check_adapter_folder")
    return found


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"checkpoint.py", "model.py", "merge.py", "loader.py", "serve.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_loading(path):
    assert not unsafe_calls(path)


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import yaml, torch, pickle\nyaml.load(s)\ntorch.load(p)\npickle.loads(b)\n"
                   "AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)\nPeftModel.from_pretrained(m, a)\n"
                   "m.save_pretrained(d, safe_serialization=False)\ntorch.load(p, weights_only=True)\n")
    assert len(unsafe_calls(bad)) == 7, unsafe_calls(bad)  # all but the last line


def test_trust_remote_code_is_off_unless_set():
    from multitune.recipes.schema import ModelConfig

    assert ModelConfig(name_or_path="m").trust_remote_code is False
