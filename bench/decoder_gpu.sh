#!/usr/bin/env bash
# The decoder's GPU checks in one run, each writing bench/results/<bench>-<gpu>-<date>.json:
#   decode_repeatability.py  every path asked 5 times; graph decoder vs generate() on a trained model
#   chat_speed.py            batch-1 chat vs the tutorial's generate(); side by side vs one column
#   studio_paths_gpu.py      chat, a training job, chat again, side by side, through the studio
#
#   bash bench/decoder_gpu.sh            # GPU: about 7 minutes, the 7B-shape model build included
#   bash bench/decoder_gpu.sh --tiny     # the same code on tiny models on the CPU (about 2 minutes)
set -u
cd "$(dirname "$0")/.."
failed=""
run() {
  echo "== bench/$*" >&2
  "${PYTHON:-python3}" bench/"$@" || failed="$failed $1"
}
if [ "${1:-}" = "--tiny" ]; then
  run decode_repeatability.py --tiny
  run chat_speed.py --tiny --tokens 24
  run studio_paths_gpu.py --tiny
else
  run decode_repeatability.py
  run chat_speed.py --modes graphs graphs-eager-prompt graphs-cache-update static
  run studio_paths_gpu.py
fi
[ -z "$failed" ] || { echo "failed:$failed" >&2; exit 1; }
