# One virtual environment in .venv; every target installs what it needs into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel, installed before the project so pyproject's torch range is already met and pip
# does not fetch a multi-GB CUDA build. GPU users: make TORCH_SPEC='torch==2.14.1' (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
# The default pair: trained by `bon demo` and committed (about 5 MB); `make default-models` remakes it.
MODELS ?= default-models
# A tiny random pair for the load benchmark, built on first use.
TINY ?= models/tiny
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test bench demo default-models lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/bon serve --policy $(MODELS)/policy --reward-model $(MODELS)/reward_model \
		--host $(HOST) --port $(PORT)

$(TINY)/.built: $(VENV)/.installed
	$(PY) -m bon.tiny_models $(TINY)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/bon demo --output demo-run

default-models: $(VENV)/.installed
	rm -rf build/demo && $(VENV)/bin/bon demo --output build/demo
	rm -rf $(MODELS) && mkdir -p $(MODELS)
	cp -r $$($(PY) -c "import json; print(json.load(open('build/demo/demo.json'))['models']['policy'])") $(MODELS)/policy
	cp -r build/demo/reward_model $(MODELS)/reward_model
	cp build/demo/demo.json $(MODELS)/demo.json

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(TINY)/.built
	$(PY) benchmarks/load_bench.py --policy $(TINY)/policy --reward-model $(TINY)/reward_model

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) models build bench-results demo-run
