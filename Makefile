# Two commands on a fresh machine:  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so that nothing else pulls a multi-GB CUDA build where none is wanted
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" -c $(CONSTRAINTS)
	$(PY) -m pip install -q -e ".[test]" -c $(CONSTRAINTS)
	touch $@

demo: install
	rm -rf outputs/tiny_lora
	PATH="$(VENV)/bin:$$PATH" deepspeed launch recipes/tiny_lora.yaml
	$(VENV)/bin/dsft generate outputs/tiny_lora/adapter --instruction "Convert the sentence to upper case." --input "The king rode to the castle."

# two pytest workers, one file each at a time (a file's module fixtures run once): the
# 1-process tests overlap the 2-rank ones on a 2-core machine
PYTEST_WORKERS ?= -n 2 --dist loadfile

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_WORKERS)

test-fast: install
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not slow" $(PYTEST_WORKERS)

bench: install
	$(PY) bench/lora_vs_peft.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
