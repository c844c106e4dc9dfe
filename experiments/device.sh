#!/usr/bin/env bash
# Stages of one GPU session on the device machine (see experiments/device.md): the model file travels in
# two halves (.dev/a, .dev/b) in two calls made back to back while the machine is warm.
#   bash experiments/device.sh part0      # call 1: keep half 1 + small wheels under /tmp
#   bash experiments/device.sh part1      # call 2: join the GGUF, install the rest, check it
#   bash experiments/device.sh launch G   # start the experiments in the background on GPUs G (e.g. 1,2,3)
#   bash experiments/device.sh wait S     # wait up to S seconds for them; pack results into $OUT
set -uo pipefail
X=/tmp/x
GGUF=$X/SmolLM2-135M-Instruct.Q4_1.gguf
case "$1" in
  part0)
    mkdir -p $X && cp .dev/a/model.part0 $X/ &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/a/*.whl ;;
  part1)
    cat $X/model.part0 .dev/b/model.part1 > $GGUF && rm $X/model.part0 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/b/*.whl &&
    sha256sum $GGUF | cut -c1-16 &&
    cp -r experiments/data $X/data ;;
  launch)
    # A 135M model's steps are bound by host launches, so several runs share one GPU well; the runs get
    # CPU cores 16+ so benchmarks timed meanwhile on GPU 0 keep cores 0-15 to themselves.
    mkdir -p /tmp/res
    PYTHONPATH=/tmp/site:$PWD/src OMP_NUM_THREADS=2 setsid nohup taskset -c 16-63 python3 experiments/run.py \
      bitext forgetting huatuo e2e diagnosis --jobs 13 --gpus "$2" --model $GGUF --data $X/data --device cuda \
      --results /tmp/res --eval-samples 100 --max-new-tokens 128 --set eval_batch_size=32 \
      > /tmp/res/driver.log 2>&1 < /dev/null &
    sleep 5; cat /tmp/res/driver.log ;;
  wait)
    end=$((SECONDS + $2))
    while pgrep -f "experiments/run.py" > /dev/null && [ $SECONDS -lt $end ]; do sleep 10; done
    cat /tmp/res/driver.log; tail -n 2 /tmp/res/logs/*.log
    tar -czf $OUT/results.tgz -C /tmp/res --exclude=adapter --exclude=checkpoints --exclude=best-adapter . ;;
esac
