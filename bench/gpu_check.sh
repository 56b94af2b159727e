#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with a CUDA device and no network.
#
#   bench/gpu_check.sh wheels     # here, with network: the serving stack's wheels into .whl/ (cp312)
#   bench/gpu_check.sh run        # there: CUDA tests, then the quick GPU benchmark, decode on API vs worker
#   bench/gpu_check.sh run tests api    # only some steps (tests, api, worker, api4): tests and one
#                                       # benchmark take about 6.5 minutes on an H200, a benchmark alone
#                                       # about 5, and one call may run 10: two or three calls
# api4: the api benchmark with --api-servers 4 (four API-server processes for the one GPU worker).
#
# The GPU machine is expected to have python3 with torch, torchvision, numpy, pillow, requests,
# matplotlib and prometheus-client; everything else travels in .whl/. Results go to $OUT
# (default build/gpu-check): the test log, BENCHMARKS-gpu*.md and results-gpu*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(litserve fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv python-multipart annotated-types
          typing-inspection annotated-doc pyzmq opentelemetry-api grpcio protobuf
          typing-extensions)

case "${1:-}" in
wheels)
    pins=()
    frozen=$(.venv/bin/pip freeze)  # the versions the tests ran with (make test installs them)
    for name in "${PACKAGES[@]}"; do
        pattern=${name//[-_]/[-_]}
        pins+=("$(grep -i "^${pattern}==" <<<"$frozen")") || { echo "$name is not installed in .venv" >&2; exit 1; }
    done
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pins[@]}"
    ls .whl
    ;;
run)
    OUT=${OUT:-build/gpu-check}
    mkdir -p "$OUT"
    # python3 there may itself be a virtual environment, whose packages --system-site-packages does not
    # reach: a .pth file puts its package folders behind the carried wheels instead.
    python3 -m venv /tmp/headswap-venv
    PY=/tmp/headswap-venv/bin/python
    python3 -c 'import site, sys; print("\n".join(p for p in site.getsitepackages() if p in sys.path))' \
        >"$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-machine.pth"
    $PY -m pip install --quiet --no-index --no-deps .whl/*.whl
    $PY -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    steps=("${@:2}")
    [ ${#steps[@]} -gt 0 ] || steps=(tests api worker api4)
    # A failure is reported and the next step still runs: device time is scarce.
    if [[ " ${steps[*]} " == *" tests "* ]]; then
        PYTHONUNBUFFERED=1 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_decode_on_worker.py \
            2>&1 | tee "$OUT/cuda-tests.log" || echo "CUDA tests FAILED (see cuda-tests.log); benchmarking anyway"
    fi
    for step in api worker api4; do
        [[ " ${steps[*]} " == *" $step "* ]] || continue
        case $step in
        api4) flags=(--decode-on api --api-servers 4) ;;
        *) flags=(--decode-on "$step") ;;
        esac
        PYTHONUNBUFFERED=1 $PY -m bench.run --device cuda --quick "${flags[@]}" \
            --out "$OUT/BENCHMARKS-gpu-$step.md" --results "$OUT/results-gpu-$step.json" --plot "$OUT/gpu-$step.png" \
            || echo "benchmark $step (${flags[*]}) FAILED"
    done
    ;;
*)
    echo "usage: $0 wheels|run" >&2
    exit 2
    ;;
esac
