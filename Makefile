# `make test` and `make demo` do all set-up on a fresh machine into .venv, once.
# torch is held at 2.13.0 by constraints.txt (on CPU machines the local +cpu wheel,
# on GPU machines the registry's CUDA build); salesforce-lavis goes in with --no-deps.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lavis_ext_installed
PYTEST_ARGS ?=

.PHONY: venv chromium test demo app clean-venv

venv: $(STAMP) chromium

# the browser test drives Debian's chromium (playwright's own browser download is unreachable here);
# a CJK font, so that its screenshots show the Chinese captions
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; }

$(STAMP): setup.py requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q --no-deps salesforce-lavis==1.0.2
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# one thread per process: 2 pytest workers and their torchrun ranks share 2 cores, and more
# threads than cores made the suite slower (measured here: 616 s with one thread, 670 s without)
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 $(PYTEST_ARGS) tests

clean-venv:
	rm -rf $(VENV)

demo: $(STAMP)
	$(PY) -m lavis_ext.demo

# the chat web app on the model `make demo` trained (APP_ARGS: e.g. --cfg-path ... --checkpoint ...)
app: $(STAMP)
	$(PY) -m lavis_ext.app $(APP_ARGS)
