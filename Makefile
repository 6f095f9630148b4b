# Two commands set everything up on a fresh machine (see README.md):
#   make run    create .venv if missing, install, run the default offline job
#   make test   create .venv if missing, install, run the whole test suite (fast + slow)
# The install is redone only when pyproject.toml or constraints.txt change (stamp file).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,qlora,ray

.PHONY: install run test test-fast bench lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	# torch / torchvision come from the machine's wheel cache; constraints.txt pins every package
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m mmllm catalog validate examples/drawn/catalog.jsonl --schema examples/toys_schema.yaml
	$(PY) -m mmllm catalog stats examples/amazon_uk_toys/train.jsonl --schema examples/toys_schema.yaml
	# smoke pipeline: LoRA on a tiny random Qwen2-VL (about a minute on 2 cores; not a real model),
	# then constrained labelling of the drawn listings and an evaluation report
	rm -rf runs/make-run
	$(PY) -m mmllm.finetune --config finetune/tiny_cpu.yaml train.output_dir=runs/make-run/tiny_cpu
	$(PY) -m mmllm.label examples/drawn/catalog.jsonl --model runs/make-run/tiny_cpu --out runs/make-run/labels.jsonl --errors runs/make-run/errors.jsonl
	$(PY) -m mmllm.evaluate --pred runs/make-run/labels.jsonl --gold examples/drawn/catalog.jsonl --model runs/make-run/tiny_cpu --report runs/make-run/report

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu"

bench: $(STAMP)
	$(PY) benchmarks/catalog_stream.py
	$(PY) benchmarks/train_step.py

# Refresh the lock after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip list --format=freeze --exclude-editable | grep -v '^mmllm' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
