#!/usr/bin/env bash
# The test command: README.md's "Run the tests" and .ci/run both run exactly this.
# Debian's Chromium (the page tests drive it), a venv with the CPU torch wheel,
# then every layer: the main run (the two-node cluster tests included), and the
# latency test as its own pytest run, which runs whatever the first one gave;
# the exit code is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium drives the page tests; the OCR tests draw their text with
# Debian's fonts (examples/text_images.py).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
   || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || [ ! -d /usr/share/fonts/truetype/liberation ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver fonts-dejavu-core fonts-liberation || exit 1
fi
python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[test]' || exit 1
# Two pytest workers, each test file whole on one (its module fixtures built
# once): half the suite's time is waiting on Ray and on processes, which the
# other worker fills. The two-node cluster (tests/test_cluster.py: its own
# `ray start` nodes, stopped by pid, never a global `ray stop`) is one file
# among them: as a run of its own after the rest it added its 2.8 minutes to
# the suite's, mostly waiting on its nodes, time the other worker now fills.
# Then the latency test with the machine to itself.
python -m pytest -n 2 --dist loadfile -m "not alone"; main=$?
python -m pytest -m alone; alone=$?
exit $(( main != 0 || alone != 0 ))
