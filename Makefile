# Thin wrappers around scripts/ (the scripts are the source of truth).
.PHONY: setup serve test prepare-model

setup:
	bash scripts/setup.sh

serve:
	bash scripts/serve.sh

test:
	bash scripts/test.sh

prepare-model: setup
	.venv/bin/mikv-vllm prepare-model
