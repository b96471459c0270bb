# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
DEVICE_VENV := .venv-device
BIN := $(VENV)/bin
DEMO := examples/digits
OUT := out

.PHONY: ansible-collection ansible-sanity device-venv-py38 demo demo-model test test-fast bench sysdeps venv device-venv clean testbed testbed-stop demo-arm64

TESTBED := tests/devices/testbed.sh

# [torch] adds PyTorch and litert-torch: about 1 minute and 1.3 GB installed with CPU-only torch.
# PyPI's Linux torch wheels add about 2.3 GB of CUDA wheels; for CPU-only wheels:
#   make test PIP_TORCH='--extra-index-url https://download.pytorch.org/whl/cpu'
PIP_TORCH ?=
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_TORCH) -e '.[convert,micro,ansible,test,torch]'
	touch $@

# The "device" side of the deploy tests: numpy 1.x and tflite-runtime, no TensorFlow, no edgeq.
device-venv: $(DEVICE_VENV)/.installed
$(DEVICE_VENV)/.installed:
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install -q 'numpy<2' 'tflite-runtime==2.14.0'
	touch $@

# Debian packages: sshd and chromium for the deploy tests; debootstrap, qemu-user-static,
# binfmt-support and iproute2 for the emulated Raspberry Pi (tests marked arm64).
# Raspberry Pi OS bullseye-era devices run Python 3.8/3.9: when a Python 3.8 is on this machine
# (pyenv's, for one), the runner is also tested on it (Debian bookworm packages no 3.8).
PYTHON38 ?= $(firstword $(wildcard /usr/bin/python3.8 /usr/local/bin/python3.8 $(HOME)/.pyenv/versions/3.8*/bin/python3.8))
device-venv-py38:
ifneq ($(PYTHON38),)
	test -x $(DEVICE_VENV)38/bin/python || { $(PYTHON38) -m venv $(DEVICE_VENV)38 && \
		$(DEVICE_VENV)38/bin/pip install -q 'numpy<2' 'tflite-runtime==2.14.0'; }
else
	@echo "no python3.8 on this machine: the Python 3.8 runner test will be skipped"
endif

sysdeps:
	bash scripts/system-deps.sh
	bash $(TESTBED) deps

test: sysdeps venv device-venv device-venv-py38
	EDGEQ_DEVICE_PYTHON=$(abspath $(DEVICE_VENV))/bin/python $(BIN)/pytest

# Everything but the slow tests, for a quick loop while editing.
test-fast: venv device-venv
	EDGEQ_DEVICE_PYTHON=$(abspath $(DEVICE_VENV))/bin/python $(BIN)/pytest -m 'not slow'

# Train the example (seconds) and convert it for a Raspberry Pi 4.
demo-model: venv
	$(BIN)/python $(DEMO)/train.py --out $(DEMO)
	mkdir -p $(OUT)
	$(BIN)/edgeq convert $(DEMO)/model.keras --calib $(DEMO)/calib.npy --eval $(DEMO)/eval.npz \
		--target rpi4 -o $(OUT)/digits_int8.tflite

demo: demo-model
	$(BIN)/edgeq check $(OUT)/digits_int8.tflite --target rpi4
	$(BIN)/edgeq check $(OUT)/digits_int8.tflite --target cortex-m4
	$(BIN)/edgeq deploy $(OUT)/digits_int8.tflite --eval $(DEMO)/eval.npz \
		--remote-dir $(CURDIR)/.cache/local-device -o reports/demo --force
	$(BIN)/edgeq sweep $(DEMO)/model.keras --calib $(DEMO)/calib.npy --eval $(DEMO)/eval.npz \
		--target rpi4 --local --remote-dir $(CURDIR)/.cache/local-device -o reports/demo-sweep --force

# An emulated Raspberry Pi 4 (arm64 Debian bookworm under qemu-user, own sshd and netns). Needs root;
# the first start builds and caches the userland (about 4 minutes).
testbed:
	bash $(TESTBED) start

testbed-stop:
	bash $(TESTBED) stop --all

demo-arm64: demo-model testbed
	eval "$$(bash $(TESTBED) env)" && $(BIN)/edgeq deploy $(OUT)/digits_int8.tflite \
		--host "$$EDGEQ_TESTBED_HOST" --identity "$$EDGEQ_TESTBED_KEY" \
		--known-hosts "$$EDGEQ_TESTBED_KNOWN_HOSTS" --python "$$EDGEQ_TESTBED_PYTHON_LITERT" \
		--eval $(DEMO)/eval.npz -o reports/demo-arm64 --force

bench: venv device-venv
	$(BIN)/python benchmarks/bench_help.py
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_runner.py
	$(BIN)/python benchmarks/bench_fleet.py
	$(BIN)/python benchmarks/bench_sweep.py
	$(BIN)/python benchmarks/bench_tflite_read.py
	$(BIN)/python benchmarks/bench_fleet_scale.py --repeat 1
	$(BIN)/python benchmarks/bench_torch.py

# The Ansible collection edgeq.fleet: dist/edgeq-fleet-*.tar.gz (embeds deploy/runner.py first), and
# ansible-test sanity run offline (tests/ansible/test_sanity.py runs it in `make test` too).
ansible-collection: venv
	PATH=$(abspath $(BIN)):$$PATH bash scripts/ansible-build.sh dist

ansible-sanity: venv
	PATH=$(abspath $(BIN)):$$PATH bash scripts/ansible-sanity.sh

clean:
	rm -rf $(OUT) reports $(DEMO)/model.keras $(DEMO)/calib.npy $(DEMO)/eval.npz
