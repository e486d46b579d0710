# The two entry points of the README. Both create (or reuse) .venv and install what they need.
#   make demo   the whole pipeline on real Fashion-MNIST (Debian's dataset-fashion-mnist)
#   make test   the test suite
#   make wheel  the device wheel (numpy, Pillow, onnxruntime, click, PyYAML; no torch) into dist/
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch builds that lie on this machine's disk (x86_64, Python 3.11); override elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Where torch comes from (scripts/install-torch.sh): auto takes PyTorch's CPU build where there is no GPU
# and its index answers; or a URL (https://download.pytorch.org/whl/cpu), or default (pip's own index).
TORCH_INDEX ?= auto
export TORCH_INDEX
STAMP := $(VENV)/.edgekd-installed
# pytest-xdist workers for `make test` (auto: one per core; 0 runs the suite in this one process)
TEST_WORKERS ?= auto

.PHONY: demo test install wheel clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	scripts/install-torch.sh $(BIN)/python "$(TORCH_PINS)"
	$(BIN)/python -m pip install -e '.[train,test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	VENV=$(VENV) scripts/demo.sh

test: $(STAMP)
	scripts/ensure-fashion-mnist.sh --optional
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

wheel:
	$(PYTHON) -m pip wheel --no-deps . -w dist
	@echo "copy dist/edgekd-*.whl to the device, then: pip install edgekd-*.whl (no torch needed to classify)"

clean-venv:
	rm -rf $(VENV)
