# dac_fast task runner. Each public target sets up what it needs on a fresh clone.
#   make demo   - encode + decode generated speech/music clips, print throughput
#   make test   - the device check's rehearsal on the CPU, then the whole test suite (builds the extension,
#                 CUDA variant where nvcc is)
#   make gpu-check OUT=dir - on a lent GPU machine (torch installed, no network): the one device command
#   make rehearse OUT=dir  - the device check's steps on this CPU machine, in a venv like the device's
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda

REHEARSE_OUT ?= out/gpu_check_rehearsal

.PHONY: setup build demo test bench gpu-check rehearse clean

$(VENV)/.deps-stamp: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -r requirements-dev.txt
	# the original package, for parity tests: its audiotools dependency pins an old stack, so no deps
	$(VPY) -m pip install -q --no-deps descript-audio-codec==1.0.0
	# audiotools' loudness meter source, for the loudness parity test (its import needs torchaudio; the test loads the meter file)
	$(VPY) -m pip install -q --no-deps descript-audiotools==0.7.2 julius
	touch $@

setup: $(VENV)/.deps-stamp

build: setup
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	$(VPY) -c "import dac_fast.ops as o; print('dac_fast._C kernels for:', sorted(o._KERNEL_DEVICES) or 'none (pure torch)')"

demo: build
	$(VPY) -m dac_fast.demo --out demo_out

# the rehearsal first, so that pytest's summary closes the output
test: build rehearse
	$(VPY) -m pytest -q -ra tests

bench: build
	$(VPY) benchmarks/bench_kernels.py
	$(VPY) benchmarks/bench_model.py

gpu-check:
	bash scripts/gpu_check.sh $(or $(OUT),gpu_out)

# python 3.12 venv with the device's torch/transformers, cached in ~/.cache/dac_fast (see the script's header)
rehearse:
	bash scripts/gpu_check.sh --rehearse $(or $(OUT),$(REHEARSE_OUT))

clean:
	rm -rf build dac_fast/_C*.so *.egg-info demo_out
