#!/usr/bin/env bash
# CUDA checks on a machine with a GPU and the packages preinstalled (pydantic carried as wheels in .whl/).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'timm', timm.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_twin.py tests/test_twin_parts.py tests/test_twin_convnets.py tests/test_kernels.py tests/test_pleas.py 2>&1 | tee ${OUT:-/tmp}/pytest.log | tail -6
cd bench
for device in cuda cpu; do python3 pleas_speed.py --device $device 2>&1 | tail -4; done
python3 twin_profile.py --model gpt2 --device cuda --tasks 4 --batch 64 2>&1 | grep -v "^void\\|^sm\\|cutlass\\|Memcpy" | tail -14
python3 twin_overhead.py --repeats 10 --tasks 4 8 --device cuda 2>&1 | tail -10
