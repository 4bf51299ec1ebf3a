# Two entry points on a fresh Debian machine, as root: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev attr acl e2fsprogs debootstrap \
	busybox-static bubblewrap fuse-overlayfs jdupes rdfind util-linux iproute2
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing apt packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: install
	$(PY) -m cowlink._demo

lint: install
	$(VENV)/bin/ruff check cowlink fuse bench tests
	$(VENV)/bin/ruff format --check cowlink fuse bench tests

typecheck: install
	$(VENV)/bin/mypy

# Each checkout gets its own pytest base directory, so concurrent runs never sweep each other's.
BASETEMP ?= /tmp/cowlink-pytest/$(notdir $(CURDIR))

unit: install
	mkdir -p $(dir $(BASETEMP))
	$(VENV)/bin/pytest -q --basetemp=$(BASETEMP)

test: lint typecheck unit

# BENCH_ARGS, e.g. "--cold" or "--datasets real"; see `python -m bench.run --help`.
bench: install
	@test -x /usr/bin/time || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null; }
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
