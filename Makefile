# make setup : system libraries (apt, when root) + .venv + requirements (idempotent)
# make demo  : digits .beton files + the quickstart IMP run under torchrun (2 CPU processes), its
#              random-reinit and shuffled-mask controls (the IMP run's masks) + their report and figures
#              (runs/quickstart_report/accuracy_vs_density.png; about 3 minutes on 2 cores)
# make data-fashion : Fashion-MNIST from Debian's dataset-fashion-mnist (apt-get when root, else the command
#              to run) -> data/fashion_mnist_{train,test}.beton and their write records
# make test  : the test suite (fast CPU tests) on TEST_WORKERS=2 pytest-xdist workers
# make bench : the benchmarks under bench/ (figures printed, never asserted)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
DATA ?= data
NPROC ?= 2
# pytest-xdist workers for make test (tests run single-threaded; a file marked xdist_group stays on one worker)
TEST_WORKERS ?= 2

.PHONY: setup data data-fashion demo test bench clean-demo

setup:
	@bash scripts/setup.sh

data: setup
	$(PY) -m utils.write_beton --dataset digits --out $(DATA) --skip-existing

data-fashion: setup
	@PY=$(PY) DATA=$(DATA) bash scripts/data_fashion.sh

demo: data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) harness.py --config configs/quickstart.yaml
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) harness.py --config configs/quickstart.yaml \
	    --prune.masks_from=runs/quickstart --prune.control=reinit --experiment.seed=1 --experiment.name=quickstart_reinit
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) harness.py --config configs/quickstart.yaml \
	    --prune.masks_from=runs/quickstart --prune.control=shuffle --experiment.name=quickstart_shuffle
	$(PY) -m utils.report runs/quickstart runs/quickstart_reinit runs/quickstart_shuffle \
	    --out-dir runs/quickstart_report

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

bench: setup
	$(PY) bench/masked_overhead.py --quick
	$(PY) bench/pruning_speed.py --quick
	$(PY) bench/checkpoint_cost.py
	$(PY) bench/harness_epochs.py
	$(PY) bench/train_throughput.py --quick
	$(PY) bench/runs_per_gpu.py --quick
	$(PY) bench/loader_throughput.py --backend ffcv torch memory

clean-demo:
	rm -rf runs/quickstart runs/quickstart_reinit runs/quickstart_shuffle runs/quickstart_report
