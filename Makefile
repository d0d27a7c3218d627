# Two verbs on a fresh clone: `make train` and `make test`. Each builds the venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel on the course machines; on a CUDA box override it,
# e.g. `make TORCH_SPEC='torch==2.11.*' train`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv train test grade lab book clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) -m course_lib train $(ARGS)

# COURSE_SMOKE=1 runs every notebook at its smoke size (about a minute each on 2 cores).
test: venv
	$(PY) -m ruff check .
	COURSE_SMOKE=1 $(PY) -m pytest $(PYTEST_ARGS)

# Grade your exercise notebooks (save them first): a score table with each failure's hint.
grade: venv
	$(PY) -m course_lib grade $(NOTEBOOKS)

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

# The book renders the notebooks' stored outputs, offline (MathJax is copied into the build
# by sphinx-mathjax-offline, no CDN), warnings as errors.
book: venv
	$(VENV)/bin/jupyter-book build book --warningiserror --nitpick --keep-going

clean:
	rm -rf $(VENV) runs book/_build
