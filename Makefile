# Two entry points (README): `make demo` and `make test`. Both create .venv and install on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned to the CPU build this machine ships locally; override for CUDA hosts, e.g.
#   make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124' venv
TORCH_SPEC ?= torch==2.13.0
# kafka-python line to test, e.g. KAFKA_PYTHON_SPEC='kafka-python==2.3.3' (default: the newest the range allows)
KAFKA_PYTHON_SPEC ?=
PYTEST_ARGS ?=

.PHONY: venv demo test lint unit integration e2e bench evaluate clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	# runtime + every extra the tests use (pyproject.toml). compat: the checkout goes on sys.path as a path
	# entry, so its packages win over a models/ folder without __init__.py in the working directory of
	# `python -m pipeline` (the default editable hook runs after such a namespace package is found)
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(if $(KAFKA_PYTHON_SPEC),$(PY) -m pip install -q '$(KAFKA_PYTHON_SPEC)')
	$(PY) -c "import kafka; print('kafka-python', kafka.__version__)"
	touch $@

demo: venv
	$(PY) -m pipeline demo

lint: venv
	$(VENV)/bin/ruff check pipeline models schemas tests
	$(VENV)/bin/ruff format --check pipeline models schemas tests docs
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: venv
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench: venv
	$(PY) -m pipeline bench

clean:
	rm -rf $(VENV) build *.egg-info var test-artifacts .pytest_cache .mypy_cache .ruff_cache
