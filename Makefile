# The two commands of the README: `make demo` and `make test`. Both create the venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= lad with a red beanie, green background
SEED ?= 7
OUT ?= out/punk.png

.PHONY: demo test clean

$(STAMP): requirements.txt requirements-cpu.txt requirements-dev.txt requirements-upscale.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps open_clip_torch==3.3.0
	$(BIN)/pip install --quiet --no-deps -r requirements-upscale.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m service generate "$(PROMPT)" --seed $(SEED) -o $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache out
