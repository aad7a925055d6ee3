#!/usr/bin/env bash
# The GPU check (issue 17): one script for a device machine with CUDA, no network and no nox.
# Run from the repository root with .wheels/ carried (filled here by benchmarks/gpu_wheels.sh):
#
#   benchmarks/gpu_check.sh                                   # results under $OUT (./gpu-out)
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_INSTALL=0 benchmarks/gpu_check.sh   # here
#
# Other settings: PYTHON (default python3), GPU_CHECK_WHEELS (default .wheels),
# GPU_CHECK_STEPS (a subset of "install certify bench5 bench20 pytest").
#
# Steps, each under its own time limit and a deadline for the whole run (GPU_CHECK_BUDGET,
# default 285 s); a failing or timed-out step is recorded and the next one runs:
#   install   the carried wheels (torchattacks, foolbox and its missing deps), then lipverify
#             itself: pip install --no-index --no-deps --no-build-isolation -e .
#   certify   benchmarks/gpu_check.py certify: 10,000 images through LipConvNet-5 (the CIFAR-10
#             test split and the reference checkpoint when carried, else synthetic, said so)
#   bench5, bench20   benchmarks/bench_soc.py --device cuda: eval, attack and train img/s of
#             LipConvNet-5 and -20 against the plain SOC baseline of the same run
#   pytest    python3 -m pytest -m gpu (tests/test_gpu.py: CUDA against the CPU); last, so
#             the bounded timing steps always run and the tests take the time left
# Files under $OUT (the device tool returns at most 8): gpu_check.json (every step's status,
# seconds and results, the other JSON merged in), install.log, pytest.log, certify.log,
# certify.json, bench_soc.log, bench_soc_5.json, bench_soc_20.json.
# Exit 0 when every step passed (or was skipped), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu-out}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
QUICK="${GPU_CHECK_QUICK:-0}"
INSTALL="${GPU_CHECK_INSTALL:-1}"
WHEELS="${GPU_CHECK_WHEELS:-.wheels}"
BUDGET="${GPU_CHECK_BUDGET:-285}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
STEPS="$WORK/steps.tsv"
: >"$STEPS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet  # GitPython (foolbox) without a git binary

# step NAME LIMIT_S LOG CMD...: run CMD with its output in LOG, under min(LIMIT, time left)
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((START + BUDGET - $(date +%s) - 5))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 5)); then
        printf '%s\tno-time\t-1\t0\t%s\n' "$name" "$limit" >>"$STEPS"
        echo "== $name: not run (the ${BUDGET} s budget is spent)"
        return 0
    fi
    echo "== $name (limit ${limit} s)" | tee -a "$log"
    local t0 rc status
    t0=$(date +%s.%N)
    set +e
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    set -e
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" >>"$STEPS"
    echo "== $name: $status (exit $rc, ${secs} s)" | tee -a "$log"
}

skip() {
    printf '%s\tskipped\t0\t0\t0\n' "$1" >>"$STEPS"
    echo "== $1: skipped ($2)"
}

# the install step (run by `step` through `timeout bash -c install_all`, hence exported)
install_all() {
    set -euo pipefail
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if ((${#wheels[@]})); then
        "$PY" -m pip install --no-index --no-deps --no-cache-dir "${wheels[@]}"
    else
        echo "no wheels in $WHEELS: torchattacks and foolbox must already be installed"
    fi
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
    "$PY" -c "import lipverify, torch; print('lipverify', lipverify.__version__, 'from', \
lipverify.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
    "$PY" -c "import torchattacks, foolbox; print('torchattacks', torchattacks.__version__, \
'| foolbox', foolbox.__version__)"
}
export -f install_all
export PY WHEELS

# GPU_CHECK_STEPS: the steps to run (default: all); the others are recorded as skipped
STEPS_WANTED=" ${GPU_CHECK_STEPS:-install certify bench5 bench20 pytest} "
wanted() { [[ "$STEPS_WANTED" == *" $1 "* ]]; }

# -- install --------------------------------------------------------------------------------
if ! wanted install; then
    skip install "not in GPU_CHECK_STEPS"
elif [[ "$INSTALL" == 1 ]]; then
    step install 90 "$OUT/install.log" bash -c install_all
else
    skip install "GPU_CHECK_INSTALL=$INSTALL"
fi

# -- 10k certification ----------------------------------------------------------------------
cert_args=(--device "$DEVICE" --json "$OUT/certify.json")
if [[ -f "$WHEELS/cifar10-test.tar.gz" ]]; then
    cert_args+=(--data "$WHEELS/cifar10-test.tar.gz")
fi
cert_limit=60
if [[ "$QUICK" == 1 ]]; then  # a small untrained network on 64 images
    cert_args+=(--n 64 --runs 1 --init-channels 8)
    cert_limit=90  # a busy 2-core CPU decoding the 10k carried JPEGs takes a while
elif [[ -f "$WHEELS/soc-lipconvnet5-hh1-lln-c10.pt" ]]; then
    cert_args+=(--checkpoint "$WHEELS/soc-lipconvnet5-hh1-lln-c10.pt")
fi
if wanted certify; then
    step certify "$cert_limit" "$OUT/certify.log" "$PY" benchmarks/gpu_check.py certify \
        "${cert_args[@]}"
else
    skip certify "not in GPU_CHECK_STEPS"
fi

# -- bench_soc on the device ----------------------------------------------------------------
bench=(--device "$DEVICE" --workloads eval,attack,train --threads 4)
if [[ "$QUICK" == 1 ]]; then bench+=(--quick); fi
if wanted bench5; then
    step bench5 60 "$OUT/bench_soc.log" "$PY" benchmarks/bench_soc.py "${bench[@]}" \
        --models 5 --json "$OUT/bench_soc_5.json"
else
    skip bench5 "not in GPU_CHECK_STEPS"
fi
if ! wanted bench20; then
    skip bench20 "not in GPU_CHECK_STEPS"
elif [[ "$QUICK" == 1 ]]; then
    skip bench20 "GPU_CHECK_QUICK=1"
else
    step bench20 90 "$OUT/bench_soc.log" "$PY" benchmarks/bench_soc.py "${bench[@]}" \
        --models 20 --json "$OUT/bench_soc_20.json"
fi

# -- the gpu tests --------------------------------------------------------------------------
if wanted pytest; then
    step pytest 150 "$OUT/pytest.log" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider
else
    skip pytest "not in GPU_CHECK_STEPS"
fi

# -- summary --------------------------------------------------------------------------------
total=$(($(date +%s) - START))
quick_flag=()
if [[ "$QUICK" == 1 ]]; then quick_flag=(--quick); fi
rc=0
"$PY" benchmarks/gpu_check.py summary --steps "$STEPS" --out "$OUT/gpu_check.json" \
    --device "$DEVICE" "${quick_flag[@]}" --pytest-log "$OUT/pytest.log" \
    --certify-json "$OUT/certify.json" \
    --bench-json "$OUT/bench_soc_5.json" "$OUT/bench_soc_20.json" --total-seconds "$total" ||
    rc=$?
if ((rc)); then echo "gpu_check: the summary failed (exit $rc)" >&2; fi
echo "gpu_check: steps (name, status, exit, seconds, limit):"
cat "$STEPS"
if grep -qvP '\t(ok|skipped)\t' "$STEPS"; then rc=1; fi
rm -rf "$WORK"
echo "gpu_check: ${total} s; results in $OUT"
exit "$rc"
