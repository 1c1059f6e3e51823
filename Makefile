# NTMobile suite. Run as root on Debian 12: `make demo` (the main job), `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
NTM   := $(VENV)/bin/ntm
APT_PACKAGES := iproute2 nftables nsd unbound curl tcpdump iputils-ping procps \
                python3-venv python3-dev gcc docker-compose \
                user-mode-linux kmod ipvsadm iptables
STAMP := $(VENV)/.setup-done

.PHONY: setup demo load-demo tour test test-unit test-lab test-ipvs soak lint typecheck bench clean lab-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v apt-get >/dev/null || { echo "make setup needs Debian/Ubuntu (apt-get)"; exit 1; }
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	# the lab's DNS servers run in the foreground under the lab, not as system services
	-@systemctl disable --now nsd unbound >/dev/null 2>&1 || true
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import ntm_cli.main, aioquic, dnslib, pyroute2, cryptography"
	touch $(STAMP)

# The main job: a 200-identity swarm, Locust sessions through handovers, a gateway kill and
# an uplink cut; verdict, plots, tear down (about 5 minutes).
demo: setup
	$(NTM) loadtest demo $(DEMO_ARGS)

load-demo: demo

# The narrated lab tour (DNS, tunnel, capture, handover) that `make demo` used to be.
tour: setup
	$(NTM) lab demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-lab: setup
	$(PY) -m pytest -q -m lab tests/integration

# Real IPVS: this kernel has none, so the lane runs inside User-Mode Linux (lab/uml.py).
test-ipvs: setup
	$(PY) -m pytest -q -m lab tests/integration/test_uml_ipvs.py

# Zero false failovers under 5 % loss on mn1's access network, for SOAK_SECONDS (the same
# test runs 60 s in `make test`).
SOAK_SECONDS ?= 600
soak: setup
	NTM_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s -m lab tests/integration/test_failover.py -k loss

# Everything CI checks: lint, types, unit tests, then the netns lab integration tests.
test: setup lint typecheck
	$(PY) -m pytest -q tests

BENCH_APT  := iperf3 openvpn
BENCH_ARGS ?=

# Benchmarks: tunnel vs OpenVPN vs plain, setup time, DC capacity; table on stdout, JSON in
# results/. Quick run: make bench BENCH_ARGS=--quick
bench: setup
	@missing=$$(for p in $(BENCH_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# py-spy samples the tunnel ends for --profile (a wheel from PyPI, into the venv)
	@test -x $(VENV)/bin/py-spy || $(PY) -m pip install -q py-spy
	$(NTM) bench $(BENCH_ARGS)

lab-down: setup
	$(NTM) lab down

clean: lab-down
	rm -rf .lab build *.egg-info
