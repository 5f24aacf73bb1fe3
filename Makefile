# xdpflow - see `make help`
PYTHON   ?= python3
CLANG    ?= clang
ARCH     := $(shell uname -m)
BPF_CFLAGS := -O2 -g -target bpf -mcpu=v3 -Wall -Werror -I/usr/include/$(ARCH)-linux-gnu
# pip refuses to touch a Debian-managed interpreter without this; harmless elsewhere
PIP      := $(PYTHON) -m pip install -q --disable-pip-version-check --break-system-packages --root-user-action=ignore

APT_PKGS := clang llvm libbpf-dev libbpf1 bpftool iproute2 xdp-tools linux-libc-dev \
            python3 python3-pip python3-dev make mount util-linux nfdump prometheus
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_OBJS := $(patsubst bpf/%.c,xdpflow/bpf/%.o,$(BPF_SRCS))

V ?= 0
ifeq ($(V),0)
Q := @
PYTEST_Q := -q
else
Q :=
PYTEST_Q := -v
endif

.PHONY: all help build deps apt pip bpffs test lint fmt bench demo fuzz clean

all: build

help:
	@echo "make deps    install apt and pip dependencies (idempotent)"
	@echo "make build   compile bpf/*.bpf.c into xdpflow/bpf/ (default)"
	@echo "make test    deps + build + the whole pytest suite (root)"
	@echo "make demo    deps + build + a namespace lab: attach, send a known mix, print counts"
	@echo "make bench   deps + build + benchmarks, written to BENCHMARKS.md"
	@echo "make fuzz    deps + build + the long hostile-frame run"
	@echo "make lint    ruff and mypy checks, and the layers (import-linter)"
	@echo "V=1          show commands and verbose test output"

# Only touches apt when something is missing, so a second run changes nothing.
# nfdump (nfcapd) and prometheus (promtool) are test tools: a policy-rc.d
# keeps their packages from starting services on this machine.
apt:
	$(Q)if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
		echo "installing apt packages"; \
		made_policy=; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
		rc=$$?; [ -n "$$made_policy" ] && rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

# Installs this checkout (editable, with test extras) unless it is already
# the installed one and every import works: a second run changes nothing.
pip: apt
	$(Q)loc=$$($(PYTHON) -m pip show xdpflow 2>/dev/null | sed -n 's/^Editable project location: //p'); \
	if [ "$$loc" != "$(CURDIR)" ] || \
	   ! $(PYTHON) -c "import cffi, pyroute2, scapy, numpy, prometheus_client, pytest, importlinter" >/dev/null 2>&1; then \
		echo "installing python packages"; \
		$(PIP) -e '.[test]'; \
	fi

deps: apt pip

FFI_MODS := xdpflow/bindings/_libbpf_ffi.py xdpflow/dataplane/_abi_ffi.py

build: $(BPF_OBJS) xdpflow/bpf/xdpflow.h $(FFI_MODS)
	@# bytecode now: where PYTHONDONTWRITEBYTECODE is set, every command would
	@# compile the modules it imports again (~50 ms a start)
	$(Q)$(PYTHON) -m compileall -q xdpflow >/dev/null

# cffi's parsed declarations as Python modules: commands start without pycparser
$(FFI_MODS) &: bpf/xdpflow.h xdpflow/bindings/libbpf.py xdpflow/dataplane/abi.py scripts/ffigen.py
	@echo "  FFIGEN $(FFI_MODS)"
	$(Q)rm -f $(FFI_MODS)  # stale ones would stand in for the header while it is read
	$(Q)$(PYTHON) scripts/ffigen.py bpf/xdpflow.h >/dev/null

xdpflow/bpf/%.bpf.o: bpf/%.bpf.c bpf/xdpflow.h bpf/parsing.h bpf/rules.h bpf/protect.h | xdpflow/bpf
	@echo "  CLANG  $@"
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

xdpflow/bpf/xdpflow.h: bpf/xdpflow.h | xdpflow/bpf
	$(Q)cp $< $@

xdpflow/bpf:
	$(Q)mkdir -p $@

bpffs:
	$(Q)mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

test: deps build bpffs
	$(Q)$(PYTHON) -m pytest $(PYTEST_Q) netns_tests

demo: deps build bpffs
	$(Q)$(PYTHON) -m xdpflow.testing.demo $(if $(DEV),--dev $(DEV))

bench: deps build bpffs
	$(Q)$(PYTHON) scripts/bench.py --out BENCHMARKS.md

fuzz: deps build bpffs
	$(Q)XDPFLOW_FUZZ_FRAMES=1000000 $(PYTHON) -m pytest $(PYTEST_Q) netns_tests -m fuzz

lint: deps
	$(Q)$(PYTHON) -m ruff check xdpflow netns_tests scripts
	$(Q)$(PYTHON) -m ruff format --check xdpflow netns_tests scripts
	$(Q)$(PYTHON) -m mypy xdpflow scripts
	$(Q)lint-imports --no-cache

clean:
	$(Q)rm -rf xdpflow/bpf $(FFI_MODS) build dist *.egg-info
