# Quick start: `make demo` runs the gateway in front of simulated vLLM pools; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: redis venv demo test lint typecheck bench-predictor bench-routing bench-gateway real-vllm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

demo: $(STAMP)
	$(BIN)/python -m loadgen.demo

test: $(STAMP) redis
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway pools predictor loadgen tests
	$(BIN)/mypy

bench-predictor: $(STAMP)
	$(BIN)/python -m loadgen.bench_predictor --out docs/results/predictor.json

bench-routing: $(STAMP)
	$(BIN)/pythia-loadgen compare --policies round_robin,least_loaded,session,prefix,llmd,pythia --ablations \
		--workload mixed --load 0.9 --replicas 8 --preset llama-3.1-8b-a100 --workflows 400 --no-progress \
		--out docs/results/routing-peak.json

bench-gateway: $(STAMP)
	$(BIN)/python -m gateway.bench.overhead --out docs/results/gateway-overhead.json

real-vllm:
	bash deploy/local/vllm-cpu.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
