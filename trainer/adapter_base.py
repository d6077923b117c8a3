"""Which base model an adapter belongs to: recorded when it is saved (a path that resolves from any directory, and a
fingerprint of the base's config), checked when it is loaded, so a moved or changed base is one clear line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from multitune.recipes.errors import InputError
from multitune.trainer.model_source import check_model_path

# Config keys that change without changing what the weights compute: left out of the fingerprint.
VOLATILE_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "quantization_config",
                 "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "architectures",
                 "output_attentions", "output_hidden_states", "return_dict"}


def resolvable_base(name_or_path: str) -> str:
    """An existing local folder as an absolute path (a relative one breaks from any other directory); a hub id as
    given."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def config_fingerprint(name_or_path: str) -> str | None:
    """sha256 (16 hex digits) of the base model's config without volatile keys, or None when its config cannot be
    read here (a hub id not in the local cache)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True).to_dict()
    except (OSError, ValueError):
        return None
    kept = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_base(adapter_dir: Path, name_or_path: str, loaded_from: str) -> dict:
    """The base as multitune.json records it: `name_or_path` as the recipe names it (a shortcut stays a shortcut,
    which multitune finds again through its model cache). PEFT's adapter_config.json, what `AutoPeftModel...` and the
    model card's snippet follow, points at `loaded_from`: the folder or hub id `from_pretrained` loaded (for a GGUF
    or an embedded shortcut, its converted folder; PEFT cannot load a shortcut)."""
    loadable = resolvable_base(loaded_from)
    peft_config = adapter_dir / "adapter_config.json"
    if peft_config.is_file():
        values = json.loads(peft_config.read_text())
        values["base_model_name_or_path"] = loadable
        peft_config.write_text(json.dumps(values, indent=2, sort_keys=True))
    return {"base_model": resolvable_base(name_or_path), "base_fingerprint": config_fingerprint(loadable)}


def adapter_record(adapter_dir: Path) -> dict:
    """multitune.json of an adapter folder ({} for an adapter saved elsewhere); InputError when it is not JSON."""
    info_file = adapter_dir / "multitune.json"
    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{info_file}: cannot be read ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(info, dict):
        raise InputError(f"{info_file}: expected a JSON object, got {type(info).__name__}")
    return info


def check_base(adapter_dir: Path, base: str, how_to_point: str) -> None:
    """InputError, in one line, when `base` is missing, or is not the model `adapter_dir` was trained on (its config
    fingerprint differs from the recorded one); `how_to_point` says how to give another base (a flag)."""
    info = adapter_record(adapter_dir)
    expected = info.get("base_model", base)
    try:
        check_model_path(base, "base model")
    except InputError:
        raise InputError(f"--adapter {adapter_dir}: its base model {base} is not there (the adapter was trained on "
                         f"{expected}); if it moved, point at it with {how_to_point}") from None
    recorded = info.get("base_fingerprint")
    found = config_fingerprint(base) if recorded else None
    if recorded and found and found != recorded:
        raise InputError(f"--adapter {adapter_dir}: {base} is not the base it was trained on ({expected}: config "
                         f"fingerprint {recorded}, this one {found}); point at that base with {how_to_point}")
