# make install: .venv with runtime + test dependencies; make test: lint + the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint demo transfer bench

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python demo.py

transfer: install
	$(BIN)/python transfer.py

bench: install
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_caption.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_cli.py
