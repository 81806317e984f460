# scanmilter: make demo | demo-stop | test | bench
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEMO   := .demo

.PHONY: demo demo-stop test test-load unit bench deps apt venv clean

deps: apt venv

apt:
	@tools/install-deps

venv: $(VENV)/.installed

# pymilter compiles against libmilter-dev, so the Debian packages come first.
$(VENV)/.installed: setup.cfg pyproject.toml | apt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[postgresql,web]' pytest hypothesis build selenium
	touch $@

demo: deps
	$(VPY) tools/demo.py --dir $(DEMO)

demo-stop:
	@if [ -x $(VPY) ]; then $(VPY) tools/stack.py down --dir $(DEMO); else echo "no demo running"; fi

# The whole suite: unit tests, then the end-to-end tests against real Postfix, clamd, spamd.
# pytest exits 5 when it collects nothing; that fails here like any other error.
test: deps
	$(VPY) -m pytest -p no:cacheprovider

# The load test at full size: 2,000 messages over 50 concurrent sessions.
test-load: deps
	SCANMILTER_LOAD_MESSAGES=2000 SCANMILTER_LOAD_SESSIONS=50 $(VPY) -m pytest -p no:cacheprovider -s tests/test_e2e_load.py

unit: deps
	$(VPY) -m pytest -p no:cacheprovider -m "not integration"

bench: deps
	WITH_PEERS=1 tools/install-deps
	$(VPY) bench/run.py

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info milter/*.egg-info
