#!/usr/bin/env bash
# The GPU session in one script (device tool): bash benchmarks/gpu_run.sh PART...
#
#   tests      every gpu-marked test (pytest -m gpu)
#   kernels alloc offload host_pool interop transfer dcp    that benchmark suite
#   demo       python -m jaxkv.demo --preset gpu
#   dcp@N      DCP gpu tests + benchmark (XLA defaults, then collectives in CUDA graphs) on the
#              first N GPUs (results/dcpN/)
#
# Needs jax-triton carried as a wheel in .whl/ (BUILD.md).  Results, logs and a summary go to
# $OUT/gpu.tgz (re-packed after every part, so a run cut short still returns what it did).
set -u
OUT=${OUT:-/tmp/out}
SRC=$PWD
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/jax_triton*.whl || exit 1
# jaxkv.kernels / jaxkv.interop live in kernels/ and interop/: run from a copy in installed shape.
W=/tmp/w; rm -rf $W; mkdir -p $W
cp -r jaxkv tests benchmarks pyproject.toml $W/ && cp -r kernels $W/jaxkv/kernels && cp -r interop $W/jaxkv/interop
cd $W
export PYTHONPATH=/tmp/site TRITON_CACHE_DIR=/tmp/triton-cache XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
R=$W/gpu; mkdir -p $R/results $R/logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/logs/nvidia-smi.txt 2>&1
python3 -c "import jax, torch, triton; print(jax.__version__, torch.__version__, triton.__version__, jax.devices())" >> $R/logs/nvidia-smi.txt 2>&1
pack() { tar czf $OUT/gpu.tgz -C $W gpu; }
run() {  # name limit_s command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > $R/logs/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a $R/summary.txt
  tail -n 3 $R/logs/$name.log | sed 's/^/    /'
  pack
}
for part in "$@"; do
  case $part in
    tests) run tests 420 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 300 tests/ ;;
    demo) run demo 300 python3 -m jaxkv.demo --preset gpu --quiet --plot $R/results/demo-gpu.png ;;
    dcp@*)  # DCP on the first N GPUs: its gpu tests and its benchmark, results under dcpN/
      n=${part#dcp@}; vis=$(seq -s, 0 $((n - 1)))
      mkdir -p $R/results/dcp$n
      export CUDA_VISIBLE_DEVICES=$vis
      run "dcp$n-tests" 300 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/test_dcp.py
      run "dcp$n-bench" 300 python3 -m benchmarks.dcp --out $R/results/dcp$n
      # the same merges with collectives recorded into CUDA graphs (dcp.COMMAND_BUFFER_XLA_FLAG)
      run "dcp$n-bench-cmdbuf" 300 env XLA_FLAGS=--xla_gpu_enable_command_buffer=+COLLECTIVES \
        python3 -m benchmarks.dcp --merge-only --label cmdbuf --out $R/results/dcp$n \
        --kinds merge_rs,merge_a2a_packed,merge_packed,bare_a2a
      run "dcp$n-tests-cmdbuf" 300 env XLA_FLAGS=--xla_gpu_enable_command_buffer=+COLLECTIVES \
        python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 240 tests/test_dcp.py
      unset CUDA_VISIBLE_DEVICES ;;
    transfer)  # NIXL wheels carried in .whl/ (nixl, nixl_cu13); DRAM then VRAM caches, UCX on lo.
      # VRAM: 2 transport probes (jax-bfc, torch-control; <= 40 s, results/transfer-vram-*-probes.*),
      # then the measurement with torch-owned caches (cuda_ipc); whole part <= 170 s
      python3 -m pip install -q --no-index --no-deps --target /tmp/site $SRC/.whl/nixl*.whl \
        || echo "transfer: nixl wheels failed to install" | tee -a $R/summary.txt
      run bench-transfer-dram 50 python3 -m benchmarks.transfer --mem dram --out $R/results
      run bench-transfer-vram 120 env UCX_PROTO_INFO=y python3 -m benchmarks.transfer --mem vram \
        --probe-budget 40 --time-budget 112 --out $R/results ;;
    *) run "bench-$part" 400 python3 -m benchmarks.$part --out $R/results ;;
  esac
done
pack
