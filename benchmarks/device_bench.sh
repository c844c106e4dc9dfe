#!/usr/bin/env bash
# The GPU machine reaches no package registry, so the packages bench_trainer.py's `trl` and `liger` rows need
# beyond its image travel as wheels, in .dev/wheels-bench (git-ignored: name it in the device tool's carry).
#
#   bash benchmarks/device_bench.sh wheels               # here: download the pinned wheels (about 2.6 MB)
#   bash benchmarks/device_bench.sh install              # there: install them into $SITE (/tmp/site), print versions
#   bash benchmarks/device_bench.sh trainer ARGS...      # there: install, then python3 benchmarks/bench_trainer.py ARGS
#   bash benchmarks/device_bench.sh run SCRIPT ARGS...   # there: install, then python3 SCRIPT ARGS (any benchmark)
#
# The pins fit what the GPU image holds (Python 3.12, torch 2.11, transformers 5.17.0, peft 0.21.0, accelerate
# 1.15.0, huggingface_hub 1.33, triton 3.6; pandas, pyarrow, xxhash, fsspec, httpx, requests are there too):
#   trl 1.15.0           transformers>=4.56.2, accelerate>=1.4.0, datasets>=4.7.0
#   datasets 4.8.5       huggingface-hub<2.0, pyarrow>=21, dill<0.4.2, multiprocess<0.70.20
#   dill 0.4.1, multiprocess 0.70.19 (its py312 wheel)   datasets' two dependencies the image lacks
#   liger-kernel 0.8.5   torch>=2.1.2, triton>=2.3.1
# trl 1.15.0 and datasets 4.x rather than the newest (trl 1.16, datasets 5.2) because Unsloth 2026.10 pins
# trl<=1.15.0 and datasets<5 (docs/speed.md says why Unsloth itself does not travel).
# Installed with --no-deps into a folder of their own, put on PYTHONPATH after the repo's src/: nothing of the
# image is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.dev/wheels-bench}
SITE=${SITE:-/tmp/site}
PINS=(trl==1.15.0 liger-kernel==0.8.5 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19)

install() {
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'bash benchmarks/device_bench.sh wheels' here and carry $WHEELS" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    python3 - <<'PY'
import importlib.metadata as m
for name in ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "triton", "trl", "datasets", "dill",
             "multiprocess", "liger-kernel", "pyarrow", "fsspec"):
    try:
        print(f"{name:16} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name:16} MISSING")
import trl, datasets, liger_kernel.transformers  # noqa: E401,F401 - fails here, not halfway through a benchmark
print("trl, datasets and liger_kernel import")
PY
}

case "${1:-}" in
    wheels)
        rm -rf "$WHEELS" && mkdir -p "$WHEELS"
        PIP=${PIP:-.venv/bin/pip}
        "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${PINS[@]}"
        ls -la "$WHEELS"; du -sh "$WHEELS" ;;
    install)
        install ;;
    trainer)
        shift; install; exec python3 benchmarks/bench_trainer.py "$@" ;;
    run)
        shift; install; exec python3 "$@" ;;
    *)
        sed -n '2,10p' "$0"; exit 2 ;;
esac
