# mmdlm: the two commands. Both create .venv (if absent) and install the package into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch/torchvision first, pinned to the releases that install from local files on our machines
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: quickstart test lint clean venv browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

## make quickstart: data -> text BPE -> image tokenizer -> MDM -> evaluation -> runs/quickstart/{metrics.json,report.md,samples.png}
quickstart: $(STAMP)
	$(BIN)/python -m mmdlm.commands.quickstart --out runs/quickstart

## make browser: Debian's chromium + chromedriver for the demo's headless browser test (tests/test_demo.py;
## Selenium drives this binary, nothing downloads a browser). `make test` tries it and goes on without it
## (that test then skips, saying why); .ci/run requires it.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null; \
	else echo "make browser: no apt-get on this machine: install chromium and chromedriver yourself" >&2; exit 1; fi

## make test: the test suite (slow learning tests included; a tiny model is trained end to end)
test: $(STAMP)
	-@$(MAKE) --no-print-directory browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
