# One virtual environment in .venv; every target installs what it needs into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel, installed before the project so pyproject's torch range is already met and pip
# does not fetch a multi-GB CUDA build. GPU users: make TORCH_SPEC='torch==2.14.1' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
MODELS ?= models/default
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The default pair (tiny, random weights until the trainers replace them) is built on first use.
$(MODELS)/.built: $(VENV)/.installed
	$(PY) -m bon.tiny_models $(MODELS)
	touch $@

serve: $(MODELS)/.built
	$(VENV)/bin/bon serve --policy $(MODELS)/policy --reward-model $(MODELS)/reward_model \
		--host $(HOST) --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(MODELS)/.built
	$(PY) benchmarks/load_bench.py --policy $(MODELS)/policy --reward-model $(MODELS)/reward_model

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) models bench-results
