# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# timm needs torchvision; this pair is the one whose wheels install offline-friendly and import together.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
DEMO   := demo

.PHONY: env demo test bench bench-mergekit quality clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,vision]'
	$(BIN)/python -c 'from mergekit_lite import kernels; kernels.library()'   # build the C kernels once, now
	touch $@

demo: env
	rm -rf $(DEMO)
	$(BIN)/python -m mergekit_lite.examples $(DEMO)/models llama 3
	$(BIN)/merge inspect $(DEMO)/models/base --against $(DEMO)/models/expert1 --top 5
	$(BIN)/merge validate recipes/ties.yaml
	$(BIN)/merge run recipes/ties.yaml $(DEMO)/merged
	$(BIN)/merge report $(DEMO)/merged --top 8
	$(BIN)/merge run recipes/twin.yaml $(DEMO)/twin
	$(BIN)/merge twin-collapse $(DEMO)/twin --weights prose=0.5,code=0.5 --out $(DEMO)/twin_prose_code
	$(BIN)/python -m mergekit_lite.examples $(DEMO)/models_resnet test_resnet 1
	$(BIN)/merge run recipes/pleas.yaml $(DEMO)/pleas
	$(BIN)/merge report $(DEMO)/pleas --top 3

test: env   # in parallel over the cores (pytest-xdist); a module's shared fixtures stay on one worker, and
            # files go out in the order tests/conftest.py gives them (the longest first)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

bench: env
	$(BIN)/python bench/writer_memory.py
	$(BIN)/python bench/tensorwise.py

bench-mergekit: env   # the same, plus mergekit 0.1.5 in its own virtual environment (downloads it once)
	$(BIN)/python bench/tensorwise.py --install-mergekit

quality: env   # merge quality on real data (digits, Python's own text); cached under bench/out/quality
	$(BIN)/python bench/quality/run.py

clean:
	rm -rf $(DEMO) bench/out .pytest_cache
