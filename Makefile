# rscaption — one-command setup, tests, demo, training and packaging.
SHELL := /bin/bash
PY_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rscaption-setup
# xauth: xvfb-run needs it and xvfb only recommends it; a JRE: the METEOR score runs in Java
APT_PKGS := python3-qgis python3-venv xvfb xauth qgis default-jre-headless
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export QT_QPA_PLATFORM := offscreen
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast demo bench soak train-default package install-plugin clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@[ -x $(PY) ] || $(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@$(PY) -c "import qgis.core, rasterio, torch, open_clip, transformers; print('setup ok: torch', torch.__version__)"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) -m rscaption.demo

bench: setup
	$(PY) -m rscaption.bench

soak: setup  # kill -9 at 20 seeded points of a real run, resume, compare (docs/reliability.md)
	$(PY) tools/kill_soak.py --points 20 --json out/kill_soak.json

train-default: setup
	$(PY) -m rscaption.cli train configs/default.yaml

package: setup
	$(PY) tools/package_plugin.py

install-plugin: package
	$(PY) tools/package_plugin.py --install

clean:
	rm -rf build dist *.egg-info backend/*.egg-info .pytest_cache
