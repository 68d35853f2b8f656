# Two entry points, both self-installing into .venv: `make reproduce` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: reproduce test install shipped-calibration

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

# The shipped calibrations data/fmnist-{ddim,ldm}/calibration/ (README "Shipped calibrations"): the published
# Q-Diffusion recipe at 5k AdaRound / 1k step-size iterations (published: 20k / 5k), both models side by
# side on one GPU; logs in data/<model>/calibration.log. Override: make shipped-calibration SHIP_SET='...'.
SHIP_SET ?= --set adaround.iters=5000 --set activations.iters=1000

shipped-calibration: $(STAMP)
	$(BIN)/modiff calibrate-shipped --model fmnist-ddim --preset 'qdiff-*' --spacing quad $(SHIP_SET) > data/fmnist-ddim/calibration.log 2>&1 & ddim=$$!; \
	$(BIN)/modiff calibrate-shipped --model fmnist-ldm --preset 'qdiff-*' $(SHIP_SET) > data/fmnist-ldm/calibration.log 2>&1 & ldm=$$!; \
	wait $$ddim; a=$$?; wait $$ldm; b=$$?; tail -n 3 data/fmnist-ddim/calibration.log data/fmnist-ldm/calibration.log; \
	test $$a -eq 0 -a $$b -eq 0
