#!/usr/bin/env bash
# The one prepared GPU check (run on a lent GPU machine from the repository root):
# the CUDA unit test, SVD init at full LLaMA-2-7B shapes against the float32 SVD reference,
# and the training-step cost of MiLoRA against LoRA on the same 7B-shaped model (3 rounds,
# alternating which goes first, medians).
# Wheels the machine lacks (pydantic, which the tests' conftest needs) can be carried in .whl/
# (git-ignored: `run` with carry [".whl"]); logs go to $OUT (default /tmp/gpu-check).
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  # --find-links picks the wheels that fit this Python (e.g. pydantic_core for cp310..cp313)
  python3 -m pip install -q --no-index --find-links .whl --no-compile --no-cache-dir --target /tmp/site \
    $(ls .whl | sed -E 's/-[0-9].*//' | sort -u)
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_initialize.py -k cuda > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
timeout 240 python3 benchmarks/svd_init.py --device cuda --full-size --accuracy-sample 5 --cache-dir /tmp/svd-cache \
  > "$OUT/svd_init.log" 2>&1
grep -v "matrix/s" "$OUT/svd_init.log" | tail -8
timeout 220 python3 benchmarks/train_step.py --device cuda --full-size --repeat 3 --cache-dir /tmp/svd-cache \
  > "$OUT/train_step.log" 2>&1
grep -v "matrix/s" "$OUT/train_step.log" | tail -7
