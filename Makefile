# Two entry points (see README): `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install system-deps model bench clean

$(BIN)/osteoscreen: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch 2.13 first, so that the project's range does not pull a CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/osteoscreen

demo: install
	$(BIN)/osteoscreen demo

# Real peers the tests talk to: DCMTK (storescu/storescp/dsrdump/dcmcjpeg…), dicom3tools (dciodvfy) and
# Orthanc (the PACS of tests/test_orthanc.py, which starts its own; Orthanc is in /usr/sbin, not in every PATH)
# with its DICOMweb plugin orthanc-dicomweb (the STOW-RS peer of tests/test_dicomweb*.py);
# docker-compose validates docker/compose.yaml without a Docker daemon (tests/test_deployment.py); Debian's
# chromium is the headless browser tests/test_dashboard.py drives through Playwright (no browser download).
system-deps:
	@if ! command -v storescp >/dev/null || ! command -v dciodvfy >/dev/null || ! command -v dcmcjpls >/dev/null \
	    || ! command -v openssl >/dev/null || ! { command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null \
	    || ! command -v docker-compose >/dev/null || ! command -v chromium >/dev/null \
	    || ! test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dcmtk dicom3tools orthanc orthanc-dicomweb openssl docker-compose chromium; fi

test: install system-deps
	$(BIN)/pytest -q

# Rebuild the shipped checkpoint from synthetic phantoms (about 55 minutes on 2 CPU cores, most of it synthesis).
model: install
	bash scripts/train_shipped_model.sh

# Benchmarks beside their references (DCMTK storescp, Orthanc, dcmj2pnm), one part after another; writes
# docs/BENCHMARKS.md and its plots (bench/README.md). Not part of the tests.
bench: install system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var demo-output .pytest_cache
