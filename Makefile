# The two set-up commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_DIR ?= demo
DEMO_CKPT := $(DEMO_DIR)/demo.safetensors
DEMO_GLYPHS := $(DEMO_DIR)/glyphs.safetensors
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-test test test-slow demo demo-checkpoint bench bench-quick bench-quickstart soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch and torchvision go in one pip call: installed apart, pip may pair them wrongly.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install --quiet "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: install-test
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/install-test-tools.sh
	$(PY) -m pytest -q

test-slow: install-test
	$(PY) -m pytest -q -m slow

# The README's quickstart, defaults and all (docs/quickstart.md: its time and accuracy).
$(DEMO_CKPT): | $(VENV)/.installed
	$(VENV)/bin/headswap demo-data $(DEMO_DIR)/data --task shapes
	$(VENV)/bin/headswap finetune --arch resnet18 --data $(DEMO_DIR)/data --out $(DEMO_CKPT)

# A second model on the same backbone: a glyphs head trained on the shapes network, frozen.
$(DEMO_GLYPHS): $(DEMO_CKPT)
	$(VENV)/bin/headswap demo-data $(DEMO_DIR)/glyphs-data --task glyphs
	$(VENV)/bin/headswap finetune --arch resnet18 --from $(DEMO_CKPT) --train head --data $(DEMO_DIR)/glyphs-data --out $(DEMO_GLYPHS)

demo-checkpoint: $(DEMO_CKPT) $(DEMO_GLYPHS)

# Two models, one backbone: POST /predict (or /models/demo/predict) and /models/glyphs/predict.
demo: install demo-checkpoint
	$(VENV)/bin/headswap inspect $(DEMO_CKPT)
	$(VENV)/bin/headswap serve --checkpoint $(DEMO_CKPT) --model glyphs=$(DEMO_GLYPHS) --host $(HOST) --port $(PORT)

$(VENV)/.installed-bench: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) -m bench.run

bench-quick: $(VENV)/.installed-bench
	$(PY) -m bench.run --quick

# The README's quickstart as written, in a fresh folder, timed -> docs/quickstart.md (~5 min on 2 cores).
bench-quickstart: install
	$(PY) -m bench.quickstart

soak: install-test
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
