# Two entry points, both self-installing into .venv: `make reproduce` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: reproduce test install

install: $(STAMP)

# torch and torchvision are pinned to the builds this project is tested with (torch-fidelity needs torchvision).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

reproduce: $(STAMP)
	$(BIN)/modiff reproduce

test: $(STAMP)
	$(BIN)/python -m pytest
