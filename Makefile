# Every target works from a fresh clone with only Python >= 3.10 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test demo ui lint db-stop clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded]'
	touch $(INSTALLED)

install: $(INSTALLED)

test: $(INSTALLED)
	$(BIN)/python -m pytest

demo: $(INSTALLED)
	$(BIN)/rdw-tracking demo

ui: $(INSTALLED)
	$(BIN)/rdw-tracking ui

lint: $(INSTALLED)
	$(BIN)/ruff check rdw_tracking rdw_tracking_tests benchmarks
	$(BIN)/ruff format --check rdw_tracking rdw_tracking_tests benchmarks

db-stop: $(INSTALLED)
	$(BIN)/rdw-tracking db stop

clean:
	-test -x $(BIN)/rdw-tracking && $(BIN)/rdw-tracking db stop
	rm -rf $(VENV) .rdw
