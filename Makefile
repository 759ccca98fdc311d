# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# OpenMP threads spin briefly, then sleep: default spinning is up to 50x slower when another job
# shares the cores, fully passive waiting 1.6x slower on decode steps (docs/performance.md).
export GOMP_SPINCOUNT ?= 10000
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-browser browser bench clean test-lmms-eval

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	# torch first and pinned: pip takes the CPU wheel from local disk (a plain `torch` pulls a CUDA build)
	$(PY) -m pip install "torch==2.13.0"
	DS_BUILD_OPS=0 $(PY) -m pip install -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/echoink demo --out demo_out

# The headless-browser tests of `echoink report` need chromium (about 300 MB with its libraries): they have their
# own target, which installs Debian's chromium when it is missing; `make test` leaves them out, .ci/run runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not browser"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser"

SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

test-browser: $(STAMP) browser
	$(PY) -m pytest -q -m browser

# lmms-eval in its own environment (lmms-eval is not an echoink dependency): the CPU torch first, lmms-eval
# 0.7.3's requirements without torchvision and timm (requirements-lmms-eval.txt says why), lmms-eval itself without
# its dependencies, then echoink. About 2.4 GB, built once (the stamp); the check is tests_lmms_eval/.
LMMS_VENV := .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.installed

$(LMMS_PY):
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install --upgrade pip

$(LMMS_STAMP): pyproject.toml requirements-lmms-eval.txt | $(LMMS_PY)
	$(LMMS_PY) -m pip install "torch==2.13.0"
	$(LMMS_PY) -m pip install -r requirements-lmms-eval.txt
	$(LMMS_PY) -m pip install --no-deps "lmms-eval==0.7.3"
	$(LMMS_PY) -m pip install -e .
	touch $(LMMS_STAMP)

test-lmms-eval: $(LMMS_STAMP)
	$(LMMS_PY) -m pytest -q tests_lmms_eval

bench: $(STAMP)
	$(PY) benchmarks/group_sharing.py

clean:
	rm -rf $(VENV) $(LMMS_VENV) demo_out .pytest_cache
