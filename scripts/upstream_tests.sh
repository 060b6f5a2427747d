#!/usr/bin/env bash
# transformers' and diffusers' own tests of the models tk.patch knows, run twice on the CPU:
# as they are (baseline), then with every model patched (scripts/upstream_tests/tk_upstream.py,
# backend "torch"). Every test that passes in the baseline must pass patched.
#
#   scripts/upstream_tests.sh TRANSFORMERS_ROOT DIFFUSERS_ROOT [OUT_DIR]
#
# *_ROOT: a folder holding the library's tests/ (a checkout at the installed version's tag, or the
# sdist's tests/ plus tests/models/timesformer from the repository; nothing of them is committed
# here). PY (default .venv/bin/python) must have the library installed. Writes OUT_DIR
# (default upstream-results/) {transformers,diffusers}-{baseline,patched}.xml and .log, and prints
# the counts and any regression; exits 1 on a regression.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
TRANSFORMERS_ROOT=$(realpath "$1"); DIFFUSERS_ROOT=$(realpath "$2"); OUT=$(realpath -m "${3:-upstream-results}")
PY=${PY:-$HERE/../.venv/bin/python}
mkdir -p "$OUT"
TRANSFORMERS_TESTS=(tests/models/timesformer/test_modeling_timesformer.py)
DIFFUSERS_TESTS=(tests/models/unets/test_models_unet_motion.py tests/models/unets/test_models_unet_3d_condition.py
                 tests/models/unets/test_models_unet_spatiotemporal.py
                 tests/models/transformers/test_models_transformer_latte.py
                 tests/pipelines/animatediff/test_animatediff.py tests/pipelines/animatediff/test_animatediff_video2video.py
                 tests/pipelines/stable_video_diffusion/test_stable_video_diffusion.py tests/pipelines/latte/test_latte.py)
status=0
run() {  # library root, tests...
    local lib=$1 root=$2; shift 2
    for mode in baseline patched; do
        local plugin=()
        [ "$mode" = patched ] && plugin=(-p tk_upstream)
        (cd "$root" && CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1 PYTHONPATH="$HERE/upstream_tests:$root${PYTHONPATH:+:$PYTHONPATH}" \
            timeout 3000 "$PY" -m pytest "$@" -q -p no:cacheprovider --continue-on-collection-errors "${plugin[@]}" \
            --junitxml="$OUT/$lib-$mode.xml" >"$OUT/$lib-$mode.log" 2>&1)
        echo "$lib $mode: $(grep -E '^(tk_upstream|[0-9]+ (passed|failed))|passed|failed' "$OUT/$lib-$mode.log" | tail -2 | tr '\n' ' ')"
    done
    "$PY" "$HERE/upstream_tests/tk_upstream.py" "$OUT/$lib-baseline.xml" "$OUT/$lib-patched.xml" || status=1
}
run transformers "$TRANSFORMERS_ROOT" "${TRANSFORMERS_TESTS[@]}"
run diffusers "$DIFFUSERS_ROOT" "${DIFFUSERS_TESTS[@]}"
exit $status
