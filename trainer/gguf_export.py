"""`multitune export --gguf`: merge an adapter into its base and write one GGUF file that llama.cpp-based tools
(llama.cpp, Ollama, LM Studio) load, with the gguf package's writer and its tensor-name maps."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from multitune.atomic import atomic_file
from multitune.recipes.errors import InputError

TYPES = ("f16", "q8_0")


def gguf_architecture(config):
    """The gguf MODEL_ARCH of a transformers config; InputError for one this exporter does not write."""
    import gguf

    arches = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    if config.model_type not in arches:
        raise InputError(f"--gguf: model type '{config.model_type}' cannot be exported to GGUF yet "
                         f"(supported: {', '.join(sorted(arches))})")
    return arches[config.model_type]


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows, (heads * head_dim, in), from transformers' rotate-half RoPE layout to llama.cpp's
    interleaved pairs (the inverse of what transformers' GGUF reader undoes for llama)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_data(name: str, weight: torch.Tensor, kind: str):
    """(array, raw GGML type or None) for one tensor: 1-D tensors (norms, biases) stay f32; 2-D weights become
    f16, or Q8_0 where the row length is a multiple of the block size (32)."""
    import gguf

    array = weight.detach().to(torch.float32).cpu().numpy()
    if array.ndim < 2:
        return array, None
    if kind == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if array.shape[-1] % block == 0:
            return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def write_vocab(writer, tokenizer, vocab_size: int, tokenizer_pre: str) -> None:
    """A byte-level BPE tokenizer (gpt2 style: SmolLM2, Qwen2, Llama 3) as GGUF vocab, merges, special ids and
    chat template; InputError for other tokenizer kinds."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError("--gguf: only byte-level BPE tokenizers (gpt2 style, e.g. SmolLM2, Qwen2, Llama 3) are "
                         "exported; this model's tokenizer is " + (model.get("type") or type(tokenizer).__name__)
                         + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, out: Path, kind: str, tokenizer_pre: str = "default", name: str | None = None) -> Path:
    """Write `model` (a transformers causal LM, Llama or Qwen2 family, weights in memory) and its tokenizer to
    `out` as GGUF: f16 or q8_0 2-D weights, f32 norms and biases, tied embeddings written once. Written to a
    temporary name and renamed, so a failed export leaves no half file."""
    import gguf

    if kind not in TYPES:
        raise InputError(f"--type must be one of {', '.join(TYPES)} (got {kind!r})")
    config = model.config
    arch = gguf_architecture(config)
    blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, blocks)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"--gguf: RoPE scaling '{rope['rope_type']}' is not exported yet")

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            writer.add_name(name or out.stem)
            writer.add_context_length(config.max_position_embeddings)
            writer.add_embedding_length(config.hidden_size)
            writer.add_block_count(blocks)
            writer.add_feed_forward_length(config.intermediate_size)
            writer.add_head_count(heads)
            writer.add_head_count_kv(kv_heads)
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
            writer.add_layer_norm_rms_eps(config.rms_norm_eps)
            writer.add_vocab_size(config.vocab_size)
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_vocab(writer, tokenizer, config.vocab_size, tokenizer_pre)

            tied = config.tie_word_embeddings
            for hf_name, weight in model.state_dict().items():
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise InputError(f"--gguf: no GGUF name for tensor {hf_name} of a {config.model_type} model")
                if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                    weight = permute_for_rope(weight, heads if "q_proj" in hf_name else kv_heads)
                data, raw_type = tensor_data(hf_name, weight, kind)
                writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except BaseException:
            writer.close()  # the handle first; atomic_file then removes the partial file
            raise
    return out


def export_adapter(adapter_dir: Path, out: Path, kind: str = "f16", base: str | None = None) -> Path:
    """`multitune export`: the adapter merged into its base (as `multitune merge` does: onto the dequantized NF4
    base for QLoRA) and written as GGUF at `out`. InputError for a bad adapter, an existing `out`, an
    unsupported model type, tokenizer or `kind`."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from multitune.trainer.merge import adapter_info, base_model_path, load_base_for_merge
    from multitune.trainer.model import check_adapter_folder
    from multitune.trainer.model_source import CONVERTED_FILE

    if kind not in TYPES:
        raise InputError(f"--type must be one of {', '.join(TYPES)} (got {kind!r})")
    if out.suffix.lower() != ".gguf":
        raise InputError(f"--gguf {out}: the file name must end in .gguf")
    if out.exists():
        raise InputError(f"--gguf {out} already exists; choose a new file name")
    check_adapter_folder(adapter_dir)  # safetensors weights only, before anything is loaded
    info = adapter_info(adapter_dir)
    base_path = base_model_path(info, base)
    model = load_base_for_merge(info, base_path, "dequantized")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    gguf_architecture(merged.config)  # refuse an unsupported model before the slow part
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    converted = Path(base_path) / CONVERTED_FILE  # a base that came from GGUF keeps its pre-tokenizer name
    pre = json.loads(converted.read_text()).get("tokenizer_pre") if converted.is_file() else None
    name = adapter_dir.resolve().parent.name if adapter_dir.name == "adapter" else adapter_dir.name
    return write_gguf(merged, tokenizer, out, kind, pre or "default", name=name)
