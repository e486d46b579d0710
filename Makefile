# The two entry points of the README. Both create (or reuse) .venv and install what they need.
#   make demo   the whole pipeline on real Fashion-MNIST (Debian's dataset-fashion-mnist)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch builds that lie on this machine's disk (x86_64, Python 3.11); override elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.edgekd-installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	VENV=$(VENV) scripts/demo.sh

test: $(STAMP)
	scripts/ensure-fashion-mnist.sh --optional
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
