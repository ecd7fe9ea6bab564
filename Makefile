# mmdlm: the two commands. Both create .venv (if absent) and install the package into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch/torchvision first, pinned to the releases that install from local files on our machines
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: quickstart test lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

## make quickstart: data -> text BPE -> image tokenizer -> MDM -> evaluation -> runs/quickstart/{metrics.json,report.md,samples.png}
quickstart: $(STAMP)
	$(BIN)/python -m mmdlm.quickstart --out runs/quickstart

## make test: the test suite (slow learning tests included; a tiny model is trained end to end)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
