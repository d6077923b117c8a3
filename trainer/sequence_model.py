"""Event-sequence model: per-feature embeddings + continuous projection → a causal LM backbone (inputs_embeds) or
an LSTM/GRU → next-activity and remaining-time heads. Saved as a PEFT adapter plus the input layer and heads.

The heads and input layer are plain modules outside the PEFT model, saved in their own safetensors file beside the
adapter (rather than through `modules_to_save`, whose save/load silently drops or renames custom heads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from multitune.compat import attn_implementation
from multitune.recipes.errors import InputError
from multitune.recipes.schema import AdapterConfig, ModelConfig, ProcessConfig
from multitune.trainer.model import check_adapter_folder, load_model

CONFIG_FILE = "sequence_model.json"
WEIGHTS_FILE = "sequence_model.safetensors"  # every trainable weight outside the PEFT adapter


class EventInputs(nn.Module):
    """One embedding per categorical feature + a projection of the continuous ones, summed or concatenated."""

    def __init__(self, vocab_sizes: list[int], n_continuous: int, width: int, combine: str, embed_dim: int):
        super().__init__()
        part = width if combine == "sum" else embed_dim
        self.combine = combine
        self.embeddings = nn.ModuleList(nn.Embedding(size, part, padding_idx=0) for size in vocab_sizes)
        self.continuous = nn.Linear(n_continuous, part)
        self.project = nn.Linear(part * (len(vocab_sizes) + 1), width) if combine == "concat" else nn.Identity()

    def forward(self, categorical: torch.Tensor, continuous: torch.Tensor) -> torch.Tensor:
        parts = [emb(categorical[..., i]) for i, emb in enumerate(self.embeddings)] + [self.continuous(continuous)]
        if self.combine == "sum":
            return torch.stack(parts).sum(0)
        return self.project(torch.cat(parts, dim=-1))


class RecurrentBackbone(nn.Module):
    """LSTM/GRU over each packed case separately: rows are split into their cases (by segment id), run as a packed
    batch, and scattered back, so no state flows from one case into the next."""

    def __init__(self, kind: str, width: int, layers: int):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(width, width, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        rows, where = (segment_ids >= 0).nonzero(as_tuple=True)
        key = rows * (int(segment_ids.max()) + 1) + segment_ids[rows, where]
        _, sequence = torch.unique(key, return_inverse=True)
        step = position_ids[rows, where]
        count, longest = int(sequence.max()) + 1, int(step.max()) + 1
        cases = x.new_zeros(count, longest, x.shape[-1])
        cases[sequence, step] = x[rows, where]
        lengths = torch.bincount(sequence, minlength=count).cpu()
        packed = pack_padded_sequence(cases, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=longest)
        result = x.new_zeros(x.shape)
        result[rows, where] = out[sequence, step]
        return result


class EventSequenceModel(nn.Module):
    def __init__(self, inputs: EventInputs, backbone: nn.Module, width: int, num_classes: int, recurrent: bool):
        super().__init__()
        self.inputs, self.backbone, self.recurrent = inputs, backbone, recurrent
        # FSDP2 wraps each of these layers as its own unit (trainer/distributed.py: shard_fsdp2).
        self._no_split_modules = [] if recurrent else list(getattr(backbone, "_no_split_modules", None) or [])
        self.next_activity = nn.Linear(width, num_classes)
        self.remaining_time = nn.Linear(width, 1)

    def forward(self, categorical, continuous, position_ids, segment_ids, attention_mask=None):
        """(next-activity logits, normalised remaining time) at every position; fp32."""
        x = self.inputs(categorical, continuous)
        if self.recurrent:
            hidden = self.backbone(x, position_ids, segment_ids)
        else:
            dtype = next(p.dtype for p in self.backbone.parameters() if p.dtype.is_floating_point)
            hidden = self.backbone(inputs_embeds=x.to(dtype), position_ids=position_ids,
                                   attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden.float()
        return self.next_activity(hidden), self.remaining_time(hidden).squeeze(-1)

    @property
    def attention(self) -> str | None:
        """The LM backbone's attention implementation (decides the packed-row mask); None for an RNN."""
        return None if self.recurrent else attn_implementation(self.backbone.config)


def model_spec(model: ModelConfig, adapter: AdapterConfig, process: ProcessConfig, manifest: dict) -> dict:
    """Everything needed to rebuild the model (written to sequence_model.json beside the adapter)."""
    return {"model": model.model_dump(mode="json"), "adapter": adapter.model_dump(mode="json"),
            "process": process.model_dump(mode="json"),
            "vocab_sizes": [len(manifest["vocab"][name]) for name in manifest["categorical"]],
            "n_continuous": len(manifest["continuous"]),
            "num_classes": len(manifest["vocab"][manifest["categorical"][0]]),
            "features": {k: manifest[k] for k in ("categorical", "continuous", "vocab", "mean", "std",
                                                  "remaining_scale_days")}}


def build_sequence_model(spec: dict, device: torch.device, gradient_checkpointing: bool = False,
                         with_adapter: bool = True) -> EventSequenceModel:
    """A fresh model from `spec`: pretrained backbone (maybe NF4, maybe LoRA) or a new RNN, random input layer and
    heads. `with_adapter=False` leaves LoRA off (for loading a saved adapter onto the base)."""
    model_cfg = ModelConfig(**spec["model"])
    adapter = AdapterConfig(**spec["adapter"])
    process = ProcessConfig(**spec["process"])
    recurrent = process.backbone != "causal_lm"
    if recurrent:
        width = process.rnn_hidden_size
        backbone = RecurrentBackbone(process.backbone, width, process.rnn_layers)
    else:
        backbone = load_model(model_cfg, adapter if with_adapter else AdapterConfig(kind="none"), device,
                              gradient_checkpointing, body_only=True, freeze=process.freeze_backbone)
        width = backbone.config.hidden_size
    inputs = EventInputs(spec["vocab_sizes"], spec["n_continuous"], width, process.combine, process.embed_dim)
    model = EventSequenceModel(inputs, backbone, width, spec["num_classes"], recurrent)
    for module in (model.inputs, model.next_activity, model.remaining_time):
        module.to(device)
    return model.to(device) if recurrent or model_cfg.quantization != "nf4" else model


def save_sequence_model(model: EventSequenceModel, weights: dict[str, torch.Tensor], spec: dict, folder: Path) -> None:
    """`weights` (the gathered trainable ones, named as in `model`) → PEFT adapter files for the LoRA part, the
    rest (input layer, heads, RNN or fully trained backbone) → sequence_model.safetensors, and the spec."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_prefix = "backbone."
    is_peft = isinstance(model.backbone, PeftModel)
    adapter_weights = {k[len(peft_prefix):]: v for k, v in weights.items() if is_peft and k.startswith(peft_prefix)}
    rest = {k: v.contiguous() for k, v in weights.items() if not (is_peft and k.startswith(peft_prefix))}
    if is_peft:
        model.backbone.save_pretrained(folder, state_dict=adapter_weights, safe_serialization=True)
    save_file(rest, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(spec, indent=2))


def load_sequence_model(folder: Path, device: torch.device) -> tuple[EventSequenceModel, dict]:
    """(model in eval mode, spec) from a folder written by `save_sequence_model`."""
    if not (folder / CONFIG_FILE).is_file():
        raise InputError(f"{folder}: not a process-monitoring model folder (no {CONFIG_FILE})")
    spec = json.loads((folder / CONFIG_FILE).read_text())
    model = build_sequence_model(spec, device, with_adapter=False)
    if (folder / "adapter_config.json").is_file():
        check_adapter_folder(folder)
        model.backbone = PeftModel.from_pretrained(model.backbone, str(folder))
    state = load_file(str(folder / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    unknown = [name for name in state if name not in params]
    if unknown:
        raise InputError(f"{folder / WEIGHTS_FILE}: weight {unknown[0]} does not belong to this model")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return model.eval(), spec
