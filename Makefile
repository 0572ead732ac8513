# The README's two commands: `make demo` (install, train both models briefly on the built-in
# synthetic faces, evaluate) and `make test` (install, run the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT := runs/demo

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

demo: install
	$(PY) train.py --data synthetic --epochs 12 --out $(DEMO_OUT) --overwrite
	$(PY) evaluate.py --runs $(DEMO_OUT) --out $(DEMO_OUT)/evaluation --refit
	$(PY) synthetic.py --out $(DEMO_OUT)/synthetic_samples.png

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .cache runs
