#!/usr/bin/env bash
# The one command for a GPU session (device tool: carry [".whl"], command "bash bench/gpu_session.sh").
# See docs/gpu_bench.md. Writes everything under $OUT (at most 8 files come back):
#   session.log        what ran, environment, install and import checks
#   pytest_gpu.log     pytest -m gpu: tests/test_gpu_data_path.py (GPU image's packages + carried wheels)
#   pytest_gpu_more.log  the other files with gpu-marked tests (+ .whl/tests/ wheels: transformers/hub 2.x)
#   gpu-<gpu>-<date>.md  the benchmark table (copy it to bench/results/ and commit it)
#   bench_gpu.json     raw results;  bench_gpu.log  every benchmark subprocess's output
# Never resets or reconfigures the GPU. Stays under the tool's 600 s per command (SESSION_LIMIT_S).
set -u
START=$SECONDS
LIMIT=${SESSION_LIMIT_S:-585}
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

# 3. GPU tests
log "pytest -m gpu tests/test_gpu_data_path.py"
timeout 150 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_data_path.py > "$OUT/pytest_gpu.log" 2>&1
log "pytest test_gpu_data_path: exit $? ($(tail -1 "$OUT/pytest_gpu.log"))"
MORE=$(grep -l -E 'mark\.gpu' tests/test_*.py | grep -v test_gpu_data_path.py | tr '\n' ' ')
if [ -n "$MORE" ] && [ "$(left)" -gt 420 ]; then
  log "pytest -m gpu $MORE (with $SITE_TESTS first on PYTHONPATH)"
  PYTHONPATH="$SITE_TESTS:$PYTHONPATH" timeout $(( $(left) - 400 )) $PY -m pytest -m gpu -q -p no:cacheprovider \
    --continue-on-collection-errors $MORE > "$OUT/pytest_gpu_more.log" 2>&1
  log "pytest others: exit $? ($(tail -1 "$OUT/pytest_gpu_more.log"))"
else
  log "other gpu-marked tests skipped (files: '${MORE}', time left $(left) s)"
fi

# 4. the benchmark, in the time that is left
BUDGET=$(( $(left) - 25 ))
log "bench.bench_gpu --time-budget $BUDGET"
$PY -m bench.bench_gpu --time-budget "$BUDGET" ${BENCH_ARGS:-} \
  --out "$OUT/gpu-{gpu}-{date}.md" --json "$OUT/bench_gpu.json" --log "$OUT/bench_gpu.log" >> "$LOG" 2>&1
log "bench exit $?; files: $(cd "$OUT" && ls | tr '\n' ' ')"
