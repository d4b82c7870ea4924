# make demo | make test | make bench — each creates .venv when absent and installs the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# On a GPU machine whose system python already has torch+CUDA (and no registry), benchmarks use it directly.
BENCH_PY := $(shell $(PYTHON) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && echo $(PYTHON) || echo $(PY))

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.cli demo

test: $(STAMP)
	$(PY) -m pytest -q
	# the Triton kernels once more on Triton's CPU interpreter (skipped in the run above without a GPU)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests/generator/test_decode_attention.py tests/generator/test_fused_attention.py tests/generator/test_fused_draw.py tests/generator/test_philox_noise.py tests/generator/test_fused_swiglu.py tests/generator/test_fused_adaln.py tests/generator/test_fused_qk_rope.py tests/generator/test_kth_largest.py tests/generator/test_launch.py tests/generator/test_matvec.py

bench:
	@if [ "$(BENCH_PY)" = "$(PY)" ]; then $(MAKE) install; fi
	$(BENCH_PY) -m benchmarks.run_all
	$(BENCH_PY) -m benchmarks.readme_table --this-device

clean:
	rm -rf $(VENV) outputs runs
