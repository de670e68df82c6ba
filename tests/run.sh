#!/usr/bin/env bash
# Install everything the test suite needs (a venv in .venv, Chromium for the browser test), then run
# it offline on the CPU. The README's test command and CI's .ci/run are this script.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r tests/requirements.txt
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
# Two test processes of one thread each (STUDIO_TEST_WORKERS to change): the tests are small and mostly
# wait on Python, so two processes on CI's two cores take half the time of one with two threads.
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -W ignore::FutureWarning \
  -n "${STUDIO_TEST_WORKERS:-2}" "$@" tests
