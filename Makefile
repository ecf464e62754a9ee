# The few commands people run. `make quickstart` and `make test` set everything up first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.discl-installed
# INSTALLER=pip skips uv (uv is the default: it resolves and installs several times faster than pip).
INSTALLER ?= uv

# Python caches compiled modules (.pyc) beside their sources unless PYTHONDONTWRITEBYTECODE is set. Some
# machines set it for every shell: then each process, every Ray worker included, compiles torch, Ray, MLflow,
# diffusers and open_clip from source at import, about twice the CPU of each worker's start
# (docs/benchmarks.md, "Quickstart"). The commands here let Python write its caches into the project's venv:
# the first process to import a module writes them and every later process reads them.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test test-slow test-all quickstart lint format mlflow-ui clean gpu-wheels gpu-check

# uv does not read pip's configuration (pip.conf, PIP_* variables): hand it the package indexes, find-links
# and constraint files pip is configured with on this machine, read from `pip config list` at run time.
define PIP_TO_UV
import re, subprocess, sys
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
args = []
for line in out.splitlines():
    m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$$", line.strip())
    if m and m[1] in flags:
        for value in m[2].split():
            if (flags[m[1]], value) not in args:
                args.append((flags[m[1]], value))
print(" ".join(f"{f} {v}" for f, v in args))
endef
export PIP_TO_UV

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when the dependency list changes (fast no-op otherwise). uv keeps its download/build cache
# in ~/.cache/uv (UV_CACHE_DIR), reused by every later install; pip is the fallback when uv is unavailable.
$(STAMP): pyproject.toml | $(BIN)/python
	@set -e; \
	if [ "$(INSTALLER)" = uv ]; then \
	  UV=$$(command -v uv || true); \
	  if [ -z "$$UV" ] && $(BIN)/python -m pip install -q uv >/dev/null 2>&1; then UV=$(BIN)/uv; fi; \
	fi; \
	if [ -n "$$UV" ] && $$UV pip install --python $(BIN)/python --index-strategy unsafe-best-match \
	     $$($(PY) -c "$$PIP_TO_UV") -e ".[dev]"; then \
	  echo "installed with uv ($$UV)"; \
	else \
	  echo "installing with pip"; $(BIN)/python -m pip install -q -e ".[dev]"; \
	fi
	touch $(STAMP)

setup: $(STAMP)

# The default suite in TEST_JOBS processes (pytest-xdist; a test file's tests stay in one process, with its
# module fixtures, and each process has its own local Ray cluster; heaviest files first, one torch thread each:
# tests/conftest.py). On 2 cores, 453 tests in two processes: 726 s, on a machine that took 946 s (CI: 948 s) before
# those two changes (docs/benchmarks.md, "Test suite"). TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= 2

test: setup
	$(BIN)/python -m pytest -q --durations=25 $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder,)

# The slow tests (not GPU-only ones): CI's default run skips them, so they are kept passing by running this
# before each merge that touches a stage, a trainer or a test fixture (docs/reliability.md, "The slow suite").
test-slow: setup
	$(BIN)/python -m pytest -q -m "slow and not gpu"

test-all: setup
	$(BIN)/python -m pytest -q -m ""

# VERBOSE=1 shows Ray's worker output and every library log line on the console.
quickstart: setup
	$(BIN)/discl quickstart $(if $(VERBOSE),--verbose,)

lint: setup
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

mlflow-ui: setup
	$(BIN)/discl ui

clean:
	rm -rf runs .pytest_cache

# The GPU check for a lent device (docs/benchmarks.md, "GPU check"): its image has torch, transformers,
# accelerate, timm and pyarrow, no venv, no Ray/MLflow and no network. `make gpu-wheels` (here, with the package
# index) fetches the pinned wheels it lacks into build/gpu-wheels (8.3 MiB; build/ is git-ignored: carry it);
# `make gpu-check` (there) unpacks them with the standard library and runs the check with the image's python.
GPU_WHEELS ?= build/gpu-wheels
# requests and its dependencies: diffusers' pipelines import it, and transformers 5 no longer pulls it in
# (0.64 MiB more: 8.9 MiB in all; charset-normalizer's wheel is built for this machine's Python version).
GPU_PKGS   := diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 requests==2.34.2 \
              urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 idna==3.21
GPU_PY     ?= python3
GPU_JSON   ?= build/gpu-check.json

gpu-wheels:
	$(PY) -m pip download --no-deps --only-binary=:all: -d $(GPU_WHEELS) $(GPU_PKGS)

gpu-check:
	@ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1 || { echo "no wheels in $(GPU_WHEELS): run 'make gpu-wheels' first"; exit 2; }
	rm -rf $(GPU_WHEELS)/site
	for w in $(GPU_WHEELS)/*.whl; do $(GPU_PY) -m zipfile -e $$w $(GPU_WHEELS)/site || exit 1; done
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_WHEELS)/site $(GPU_PY) -m discl_ray.cli bench gpu --json $(GPU_JSON) $(GPU_ARGS)
