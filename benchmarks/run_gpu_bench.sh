#!/usr/bin/env bash
# One call of the device tool: install the carried wheels, record the machine, run the benchmark.
#   bash benchmarks/run_gpu_bench.sh --size 0.5b --latency        (with `carry: [".whl"]`)
# The GPU image has torch, transformers, peft and accelerate but not trl, datasets, bitsandbytes or
# liger-kernel: those travel as python-3.12 manylinux wheels in .whl/ (git-ignored; see
# docs/benchmarks.md for the pip download line). .whl/alt and .whl/opt hold fallbacks that are
# installed only if the image's packages turn out too old for the primary wheels.
set -uo pipefail
OUT=${OUT:-/tmp/shoefix-bench-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "== $(date -u +%FT%TZ) $(uname -r) $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
  --format=csv || true
python3 - <<'PY'
import importlib.metadata as md
for n in ["torch", "transformers", "peft", "accelerate", "tokenizers", "huggingface-hub", "safetensors", "pyarrow",
          "fsspec", "numpy", "pandas", "triton", "xxhash", "dill", "multiprocess", "trl", "datasets", "bitsandbytes"]:
    try:
        print(f"image {n}=={md.version(n)}")
    except md.PackageNotFoundError:
        print(f"image {n}: not installed")
PY
pip_in() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
if [ ! -d /tmp/site/trl ]; then pip_in .whl/*.whl || { echo "wheel install failed"; exit 1; }; fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import datasets" 2>/dev/null; then
  echo "datasets 5.x does not import here; falling back to .whl/alt"; python3 -c "import datasets" 2>&1 | tail -2
  rm -rf /tmp/site/datasets /tmp/site/datasets-*.dist-info; pip_in .whl/alt/*.whl
fi
if ! python3 -c "import trl; from transformers import TrainingArguments as T; assert 'train_sampling_strategy' in T.__dataclass_fields__" 2>/dev/null; then
  echo "image transformers too old for trl 1.16 / the repo's SFTConfig; installing .whl/opt"; pip_in .whl/opt/*.whl
fi
python3 -c "
import torch, transformers, peft, accelerate, trl, datasets, bitsandbytes
try:
    import liger_kernel; lk = 'ok'
except Exception as e:
    lk = repr(e)
print('using torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| trl', trl.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__,
      '| datasets', datasets.__version__, '| bitsandbytes', bitsandbytes.__version__, '| liger', lk)
"
python3 benchmarks/gpu_train_throughput.py --out "$OUT" "$@"
rc=$?
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv || true
exit $rc
