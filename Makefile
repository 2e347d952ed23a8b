# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first, pinned: an unpinned install pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,tensorboard,mlflow,tune,spark,ray]'
	# Spark (tests/test_cluster_recipes.py) needs a JRE: on Debian/Ubuntu, the distribution's when java is missing
	command -v java >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -q && \
		$$S apt-get install -y -q --no-install-recommends default-jre-headless; }
	touch $(STAMP)

install: $(STAMP)

DEMO := demo_run

# The main job end to end: generate 200k funnel impressions, write a config by inspecting the data,
# train an MMoE (CTR head + ESMM CTCVR head), and print test AUC next to the Bayes-optimal AUC.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/recmtl datagen funnel $(DEMO)/data --rows 200000 --seed 0
	$(BIN)/recmtl init $(DEMO)/data/train.parquet --task click --task conversion --head conversion=esmm \
		--validation $(DEMO)/data/valid.parquet --test $(DEMO)/data/test.parquet --group-column user_id \
		--tower mmoe -o $(DEMO)/config.yaml
	$(BIN)/recmtl train $(DEMO)/config.yaml --out $(DEMO)/run --set train.epochs=6
	@echo "== test metrics; reference_auc is the Bayes-optimal AUC of the true probabilities =="
	$(BIN)/recmtl evaluate $(DEMO)/run $(DEMO)/data/test.parquet --reference $(DEMO)/data/test.truth.parquet

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff: pyflakes, pycodestyle, import order, pyupgrade (configured in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/speed/bench_train_throughput.py

clean:
	rm -rf $(VENV) demo_run build *.egg-info
