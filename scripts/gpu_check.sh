#!/usr/bin/env bash
# One prepared run of the GPU checks and benchmarks on an NVIDIA machine without network.
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# 1. installs Backplane and the plugin template into the machine's Python without
#    dependencies (torch, triton, transformers come with the image; wheels for
#    what the image lacks may be put in .whl/ beforehand);
# 2. runs the gpu-marked graph tests: the runner's CUDA graphs against eager
#    output, the CudaGraphRunner and Triton decode replay;
# 3. times decode steps (scripts/gpu_bench.py) of the qwen2-0.5b and llama-1b
#    shapes at batch 1/16/64: eager, decode graphs, graphs + async scheduling,
#    graphs + async + the engine-core process; then torch.compile + graphs (O2);
# 4. runs the mixed workload against transformers in the same run.
# Each phase has its own time limit, so a slow phase leaves the others' results;
# the log and a tarball of every JSON result land in OUT_DIR.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . -e examples/plugin_template \
  >"$RES/install.log" 2>&1 || { tail -20 "$RES/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

phase() {  # phase NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local begin=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - begin)) s"
  grep -v -E "^(INFO|DEBUG)|Capturing decode graphs" "$RES/$name.log" | tail -"${TAIL:-14}"
}

MODELS=/tmp/bench_models
(for shape in qwen2-0.5b llama-1b; do
   $PY -m backplane.entrypoints.cli.main bench make-model --shape "$shape" "$MODELS/$shape"
 done) >"$RES/make_models.log" 2>&1 &
MAKER=$!

phase gpu_tests "${TESTS_LIMIT:-120}" $PY -m pytest -x -q -p no:cacheprovider -m gpu \
  --tb=short tests/platforms/gpu/test_cuda_graph_runner.py tests/platforms/gpu/test_cuda_device.py \
  -k "graph or piecewise"
wait $MAKER
phase latency "${LATENCY_LIMIT:-150}" $PY scripts/gpu_bench.py "$RES" \
  "$MODELS/qwen2-0.5b" "$MODELS/llama-1b" --configs eager,graphs,graphs_async,graphs_async_proc
phase throughput "${THROUGHPUT_LIMIT:-150}" $PY scripts/gpu_bench.py "$RES" \
  "$MODELS/qwen2-0.5b" --configs eager_async,piecewise --throughput
phase compiled "${COMPILE_LIMIT:-80}" $PY scripts/gpu_bench.py "$RES" \
  "$MODELS/qwen2-0.5b" --configs compiled_graphs
tar czf "$OUT/results.tgz" -C "$RES" .
