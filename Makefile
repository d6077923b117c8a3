# Two commands on a fresh machine: `make demo` (install + the tiny QLoRA recipe end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel here, the CUDA build of the same version on a GPU machine.
	$(BIN)/python -m pip install -q -c constraints.txt torch
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/multitune train recipes/debug/tiny_ticket_qlora.yaml --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs cache/prep
