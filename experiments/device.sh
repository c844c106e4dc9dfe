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
  # Session of 2026-11-30 (one H200): the GGUF in three parts (.dev/p0 with the small wheels, .dev/p1,
  # .dev/p2 with jieba), MMLU/CMMLU copied to .dev/bench; bitext, bitext-mix10 and huatuo retrained with
  # their adapters kept, evaluated (intervals, per-prompt losses), then scored on MMLU/CMMLU 0- and 5-shot.
  p0)
    mkdir -p $X && cp .dev/p0/m0 $X/ && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/p0/*.whl ;;
  p1)
    cp .dev/p1/m1 $X/ ;;
  p2)
    cat $X/m0 $X/m1 .dev/p2/m2 > $GGUF && rm $X/m0 $X/m1 &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/p2/*.whl &&
    sha256sum $GGUF | cut -c1-16 && cp -r experiments/data $X/data && cp -r .dev/bench $X/bench ;;
  forgetting-benchmarks)
    mkdir -p /tmp/res
    export PYTHONPATH=/tmp/site:$PWD/src OMP_NUM_THREADS=2
    timeout "$2" python3 experiments/run.py bitext forgetting huatuo --only bitext bitext-mix10 huatuo --jobs 3 --gpus 0 \
      --model $GGUF --data $X/data --device cuda --results /tmp/res --eval-samples 100 --max-new-tokens 128 \
      --keep-adapter --set eval_batch_size=32 > /tmp/res/driver.log 2>&1
    cat /tmp/res/driver.log; tail -n 3 /tmp/res/logs/*.log
    python3 experiments/benchmarks.py /tmp/res/runs/bitext /tmp/res/runs/bitext-mix10 /tmp/res/runs/huatuo \
      --benchmarks $X/bench/mmlu-en,$X/bench/cmmlu-zh --shots 0,5 --model $GGUF --device cuda \
      --out /tmp/res/benchmarks.json 2>&1 | tail -n 8
    tar -czf $OUT/results.tgz -C /tmp/res --exclude=adapter --exclude=checkpoints --exclude=best-adapter . ;;
  # The forgetting experiment's other fix runs, retrained and evaluated like the rerun above (per-prompt
  # losses in the predictions, so their degradation cut gets an interval against results/rerun's bitext).
  # After p0, p1, p2 in the same warm session:   bash experiments/device.sh fixes 420
  # Four runs share GPU 0 (the rerun's three took ~160 s together); no adapters kept, no MMLU/CMMLU.
  # It writes to its own /tmp/fixes, seeded with results/rerun/forgetting.json so that the packed one keeps
  # bitext-mix10 beside the new runs: unpack with  tar -xzf results.tgz -C results/rerun  (driver-fixes.log
  # and logs/ are this stage's own; nothing of the earlier rerun is overwritten but forgetting.json).
  fixes)
    rm -rf /tmp/fixes && mkdir -p /tmp/fixes && cp results/rerun/forgetting.json /tmp/fixes/
    export PYTHONPATH=/tmp/site:$PWD/src OMP_NUM_THREADS=2
    timeout "$2" python3 experiments/run.py forgetting --only bitext-mix20 bitext-mix30 bitext-lr1e-5 bitext-earlystop \
      --jobs 4 --gpus 0 --model $GGUF --data $X/data --device cuda --results /tmp/fixes --eval-samples 100 \
      --max-new-tokens 128 --set eval_batch_size=32 > /tmp/fixes/driver-fixes.log 2>&1
    echo "exit $? (124: cut off by the timeout)"; cat /tmp/fixes/driver-fixes.log; tail -n 3 /tmp/fixes/logs/*.log
    tar -czf $OUT/results.tgz -C /tmp/fixes --exclude=adapter --exclude=checkpoints --exclude=best-adapter . ;;
esac
