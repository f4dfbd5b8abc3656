# make demo / make test create .venv on first use and install pinned dependencies.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-kernels-emulated lint format clean

$(BIN)/tilemem: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/tilemem

demo: $(BIN)/tilemem
	$(BIN)/tilemem demo

test: $(BIN)/tilemem
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -n 2  # both cores: the suite is CPU-bound, its tests independent

# The native kernels' tests on a CPU without AVX512 (where `make test` skips them): built on SIMDe's
# emulated AVX512 (apt-get install libsimde-dev; tests/emulated_avx512/, for tests only), AMX off.
KERNEL_TESTS := tests/test_kernels.py tests/test_x12.py tests/test_kernel_abi.py
KERNEL_TESTS += tests/test_parity.py::test_bf16_greedy_agrees_with_transformers  # fp32 never reaches the kernels
test-kernels-emulated: $(BIN)/tilemem
	TILEMEM_EMULATE_AVX512=1 $(BIN)/pytest -n 2 $(KERNEL_TESTS)

format: $(BIN)/tilemem
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) checkpoints
