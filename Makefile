# ecg-stream: `make install`, `make test`, `make demo`. See README.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA_ROOT ?= $(abspath ../shared/data)

# Use the staged datasets when they exist; otherwise the code downloads from PhysioNet.
ifneq ($(wildcard $(DATA_ROOT)/mitdb/100.hea),)
export ECG_DATA_DIR ?= $(DATA_ROOT)/mitdb
endif

.PHONY: install test lint train train-inter train-intra train-ecg5000 evaluate demo bench clean

install: $(VENV)/.installed

# torch first, from PyTorch's CPU wheel index: from PyPI, Linux gets a CUDA build (several GB).
# A GPU build: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Where that index is unreachable, pip falls back to its configured wheel folders; two
# retries keep that fallback quick.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
EXTRAS        ?= dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --retries 2 torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

# The three trainings are independent: `make -j3 train` runs them side by side.
train: train-inter train-intra train-ecg5000

train-inter: install
	$(BIN)/ecg-stream train --split inter --output models/weights/ecgnet-ds1.pt

# train-intra and train-ecg5000 train the current network; the committed intra and ECG5000
# checkpoints are EcgNet 1.0.0 from older code (models/MODEL_CARD.md, Training).
train-intra: install
	$(BIN)/ecg-stream train --split intra --epochs 10 --set train.beats_per_epoch=40000 \
		--output models/weights/ecgnet-intra.pt

train-ecg5000: install
	$(BIN)/ecg-stream train --ecg5000 --output models/weights/ecg5000-ae.pt

evaluate: install
	$(BIN)/ecg-stream evaluate --out reports/evaluation
	$(BIN)/ecg-stream evaluate-events --out reports/events

demo: install
	$(BIN)/ecg-stream demo --out reports/demo

bench: install
	$(BIN)/ecg-stream bench --out reports/bench

clean:
	rm -rf reports .pytest_cache .ruff_cache
