# Two entry points for a fresh machine (Python 3.11): `make demo` and `make test`.
# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build;
# the project's own range (torch>=2.3) is then already satisfied.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH   = torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/xdl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]' $(TORCH)
	# Independent references for the agreement tests: FGSM/APGD/Square/AutoAttack (torchattacks)
	# and Grad-CAM (grad-cam, with ttach); --no-deps because both would pull torchvision, which
	# does not import beside the CPU wheel.
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1 grad-cam==1.5.7 ttach==0.0.3
	touch $(BIN)/xdl

setup: $(BIN)/xdl

# Trains on the embedded digits data (runs/demo) and writes the audit (runs/demo/audit.html).
demo: setup
	$(BIN)/xdl train --out runs/demo --force
	$(BIN)/xdl audit runs/demo

# The whole suite, offline and CPU-only, in two worker processes (one per CI core: most tests
# wait on single-threaded subprocesses). pytest's exit code 5 (no tests collected) is a failure here too.
test: setup
	$(BIN)/python -m pytest -n 2

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
