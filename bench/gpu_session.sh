#!/usr/bin/env bash
# The one command for a GPU session (device tool: carry [".whl"], command "bash bench/gpu_session.sh").
# See docs/gpu_bench.md. Writes everything under $OUT (at most 8 files come back):
#   session.log        what ran, environment, install and import checks
#   pytest_gpu.log     pytest -m gpu: tests/test_gpu_data_path.py, tests/test_gpu_issue25.py (image's packages + carried wheels)
#   pytest_gpu_more.log  the other files with gpu-marked tests (+ .whl/tests/ wheels: transformers/hub 2.x)
#   gpu-<gpu>-<date>.md  the benchmark table (copy it to bench/results/ and commit it)
#   bench_gpu.json     raw results;  bench_gpu.log  every benchmark subprocess's output
#   doctor.json        python app.py --doctor --json on the device
#   summary.md         one row per part, most important first: a figure, or why it did not run
# Never resets or reconfigures the GPU. Finishes within SESSION_LIMIT_S (default 290 s).
set -u
START=$SECONDS
LIMIT=${SESSION_LIMIT_S:-290}  # tests and benchmark together within 5 minutes (issue 25)
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
: > "$LOG"
log() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((LIMIT - (SECONDS - START))); }

log "gpu_session: $(git rev-parse --short HEAD 2>/dev/null || echo '?') in $(pwd)"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1
  echo "python: $($PY -V 2>&1) at $(command -v $PY)"
  echo "cpus: $(nproc), $(free -g | awk '/Mem:/{print $2" GiB RAM, "$7" GiB available"}')"
  $PY -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|diffsynth|transformers|accelerate|huggingface.hub|safetensors|psutil|einops|peft|torchvision|pytest|modelscope) '
} >> "$LOG" 2>&1

# 1. carried wheels: .whl/*.whl for the benchmark and the tests, .whl/tests/*.whl for tests only
BASE_PYTHONPATH=${PYTHONPATH:-}
SITE=/tmp/site
SITE_TESTS=/tmp/site-tests
if ls .whl/*.whl > /dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheel(s) into $SITE: $(cd .whl && ls *.whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >> "$LOG" 2>&1 \
    || log "WARNING: pip install of .whl/*.whl failed (see above)"
else
  log "no .whl/*.whl carried: DiffSynth and (if absent) diffusers rows will say 'not run'"
fi
if ls .whl/tests/*.whl > /dev/null 2>&1; then
  log "installing $(ls .whl/tests/*.whl | wc -l) test-only wheel(s) into $SITE_TESTS"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE_TESTS" .whl/tests/*.whl >> "$LOG" 2>&1 \
    || log "WARNING: pip install of .whl/tests/*.whl failed (see above)"
fi
export PYTHONPATH="$SITE${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
export PYTHONUNBUFFERED=1

# 2. import check (cheap; tells a failed row's cause at a glance)
$PY - >> "$LOG" 2>&1 << 'EOF'
import importlib, time
t = time.time()
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
def check(name):
    try:
        mod = importlib.import_module(name)
        print("import ok:", name, getattr(mod, "__version__", ""))
        return True
    except Exception as exc:
        print("import FAILED:", name, type(exc).__name__, str(exc)[:300])
        return False
for name in ("diffusers", "transformers", "accelerate", "psutil", "engine",
             "diffusers.models.transformers.transformer_qwenimage"):
    check(name)
try:
    import diffsynth
    print("import ok: diffsynth (modelscope importable)")
except ModuleNotFoundError as exc:
    print(f"diffsynth import: missing {exc.name!r}; retrying with bench_gpu's modelscope stub")
    from bench.bench_gpu import _drop_modules, _stub_modelscope
    _drop_modules("diffsynth"); _drop_modules("modelscope"); _drop_modules("modelscope_hub"); _stub_modelscope()
for name in ("diffsynth", "diffsynth.models.qwen_image_dit", "diffsynth.core.vram.layers", "diffsynth.pipelines.qwen_image"):
    check(name)
print(f"imports took {time.time() - t:.1f} s")
EOF

# 3. the rows, most important first; each one ends with a figure or says why it did not run
#    (summary.md). Budget on an H100/H200 (LIMIT 290 s, the device's start not counted):
#    ~20 s setup and imports, <=70 s core GPU tests, <=40 s doctor, the benchmark in what is left
#    but 45 s, then the other gpu-marked tests in the rest.
SUMMARY="$OUT/summary.md"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
{ echo "# GPU session $(git rev-parse --short HEAD 2>/dev/null || echo '?') on ${GPU_NAME:-no GPU (nvidia-smi found none)}"; echo; } > "$SUMMARY"
row() { echo "- $1" >> "$SUMMARY"; log "row: $1"; }
pytest_row() {  # name, log file, exit status
  local tail_line; tail_line=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$2" 2>/dev/null | tail -1)
  if [ "$3" = 124 ]; then row "$1: not finished, stopped by its time limit (${tail_line:-no result line})"
  elif [ -n "$tail_line" ]; then row "$1: exit $3, $tail_line"
  else row "$1: exit $3, no pytest result line (see $(basename "$2"))"; fi
}

CORE="tests/test_gpu_data_path.py tests/test_gpu_issue25.py"
T=$(( $(left) > 140 ? 70 : $(left) / 3 ))
log "pytest -m gpu $CORE (limit ${T} s)"
timeout "$T" $PY -m pytest -m gpu -q -p no:cacheprovider $CORE > "$OUT/pytest_gpu.log" 2>&1
pytest_row "core GPU tests ($CORE)" "$OUT/pytest_gpu.log" $?

if [ "$(left)" -gt 100 ]; then
  log "doctor: python app.py --doctor --json"
  timeout 40 $PY app.py --doctor --json --model-dir /tmp/doctor-models > "$OUT/doctor.json" 2>> "$LOG"
  rc=$?
  fig=$($PY -c "import json,sys; r=json.load(open(sys.argv[1])); s=r.get('streamed_run',{}); t=r.get('transfer',{}); print(f\"streamed run {s['s_per_step']*1000:.1f} ms/step, transfer bound {(s.get('transfer_bound_s') or 0)*1000:.1f} ms, overlap {s.get('overlap') or 0:.0%}; H2D pinned {t.get('pinned_gib_s',0):.1f} GiB/s\" if 's_per_step' in s else 'no figure: ' + str(s.get('error') or s.get('skipped')))" "$OUT/doctor.json" 2>&1 | tail -1)
  row "doctor (exit $rc): $fig"
else
  row "doctor: not run, $(left) s left"
fi

BUDGET=$(( $(left) - 45 ))
if [ "$BUDGET" -gt 40 ]; then
  log "bench.bench_gpu --time-budget $BUDGET"
  $PY -m bench.bench_gpu --time-budget "$BUDGET" --configs "${BENCH_CONFIGS:-ours-bf16,compute,ours-fp8,diffusers-block,diffsynth-bf16,diffsynth-fp8,diffusers-leaf}" \
    --limits "${BENCH_LIMITS:-0,16}" ${BENCH_ARGS:-} \
    --out "$OUT/gpu-{gpu}-{date}.md" --json "$OUT/bench_gpu.json" --log "$OUT/bench_gpu.log" >> "$LOG" 2>&1
  rc=$?
  if [ -s "$OUT/bench_gpu.json" ]; then  # in the order they ran (the table groups them its own way)
    $PY - "$OUT/bench_gpu.json" << 'EOF' | while read -r line; do row "$line"; done
import json, sys
for res in json.load(open(sys.argv[1]))["results"]:
    if "h2d" in res:
        print(f"bench H2D pinned: {res['h2d']['pinned_gib_s']:.1f} GiB/s, pageable {res['h2d']['pageable_gib_s']:.1f} GiB/s")
    for r in res.get("rows", []):
        ok = r.get("status") == "ok"
        print(f"bench {r['config']}: " + (f"{r['s_per_step']:.3f} s/step" if ok else f"{r.get('status')}: {r.get('why')}"))
EOF
  else
    row "bench: exit $rc, no results written (see bench_gpu.log)"
  fi
else
  row "bench: not run, only $(left) s left"
fi

MORE=${MORE_TESTS-$(grep -l -E 'mark\.gpu' tests/test_*.py | grep -v -E 'test_gpu_data_path.py|test_gpu_issue25.py' | tr '\n' ' ')}
if [ -n "$MORE" ] && [ "$(left)" -gt 30 ]; then
  log "pytest -m gpu $MORE (with $SITE_TESTS first on PYTHONPATH)"
  PYTHONPATH="$SITE_TESTS:$PYTHONPATH" timeout $(( $(left) - 10 )) $PY -m pytest -m gpu -q -p no:cacheprovider \
    --continue-on-collection-errors $MORE > "$OUT/pytest_gpu_more.log" 2>&1
  pytest_row "other GPU tests ($MORE)" "$OUT/pytest_gpu_more.log" $?
else
  if [ -z "$MORE" ]; then row "other GPU tests: none to run (no other gpu-marked test file)"
  else row "other GPU tests ($MORE): not run, only $(left) s left"; fi
fi
log "done in $((SECONDS - START)) s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$SUMMARY" | tee -a "$LOG"
