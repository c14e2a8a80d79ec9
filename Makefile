# Everything installs itself on first use: a fresh machine needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS = --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc
PROTOS := protos/blobstore/v1/storage.proto protos/blobstore/internal/records.proto

DATA_DIR ?= ./data
PORT ?= 50051

.PHONY: install serve test lint typecheck proto proto-check pytest bench bench-s3pg soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/blobstore serve --data-dir $(DATA_DIR) --port $(PORT)

test: lint typecheck proto-check pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping, so it reads a tree of links instead.
PKGROOT := build/pkgroot
typecheck: $(STAMP)
	@mkdir -p $(PKGROOT)/blobstore
	@ln -sfn $(CURDIR)/protos/blobstore/v1 $(PKGROOT)/blobstore/v1
	@ln -sfn $(CURDIR)/protos/blobstore/internal $(PKGROOT)/blobstore/internal
	@ln -sfn $(CURDIR)/client $(PKGROOT)/blobstore/client
	@ln -sfn $(CURDIR)/server $(PKGROOT)/blobstore/server
	@ln -sfn $(CURDIR)/tests $(PKGROOT)/tests
	@ln -sfn $(CURDIR)/bench $(PKGROOT)/bench
	cd $(PKGROOT) && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml --explicit-package-bases \
		blobstore/server blobstore/client tests $$(test -n "$$(ls bench/*.py 2>/dev/null)" && echo bench)

# Regenerates the Python code of the protos; commit the result.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos $(PLUGINS) --python_out=protos --mypy_out=protos $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -Iprotos $(PLUGINS) --grpc_python_out=protos --mypy_grpc_out=protos protos/blobstore/v1/storage.proto

# Fails when the committed generated code differs from what the protos generate.
proto-check: proto
	@git diff --exit-code --stat -- protos/ || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- protos/)" || { git status --short -- protos/; echo "untracked generated files: run 'make proto' and commit"; exit 1; }

# The whole suite on the embedded pair, then the integration suite again on the shared pair
# (S3 chunks on Ceph's RADOS Gateway + a PostgreSQL index, both installed and started by the tests).
pytest: $(STAMP)
	$(BIN)/pytest -q
	$(BIN)/pytest -q tests/integration --backend=s3pg

bench: $(STAMP)
	$(BIN)/python -m bench.run

# blobstore on S3 (Ceph RGW) + PostgreSQL against boto3 straight to the same gateway.
bench-s3pg: $(STAMP)
	$(BIN)/python -m bench.s3pg

soak: $(STAMP)
	$(BIN)/pytest -q tests/crash --soak

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
