# Two commands do all set-up on a fresh machine:
#   make demo   train a small LSTM LM, export it, serve it, stream a continuation (~2 min on an idle
#               2-core CPU, longer when the machine is loaded)
#   make test   the whole suite: generated-code drift, ruff, mypy, pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck pytest protos clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in the `train` extra, so this resolves to the local CPU wheel, not a CUDA build.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/rnnserve demo

test: lint typecheck pytest

lint: setup
	$(BIN)/python protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' editable import hook, so it checks a tree of links laid out like the
# installed `rnnserve` package.
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/rnnserve
	ln -s $(CURDIR)/rnnserve/*.py $(CURDIR)/rnnserve/py.typed build/typecheck/rnnserve/
	ln -s $(CURDIR)/protos/rnnserve/v1 build/typecheck/rnnserve/v1
	ln -s $(CURDIR)/protos/rnnserve/inference build/typecheck/rnnserve/inference
	ln -s $(CURDIR)/training build/typecheck/rnnserve/training
	ln -s $(CURDIR)/export build/typecheck/rnnserve/export
	ln -s $(CURDIR)/server build/typecheck/rnnserve/server
	ln -s $(CURDIR)/clients build/typecheck/rnnserve/client
	cd build/typecheck && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p rnnserve

pytest: setup
	$(BIN)/pytest

protos: setup
	$(BIN)/python protos/generate.py

clean:
	rm -rf build demo_out .pytest_cache .mypy_cache .ruff_cache
