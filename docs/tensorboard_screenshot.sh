#!/usr/bin/env bash
# Screenshot TensorBoard's scalars dashboard for a run folder with headless Chromium (Debian package chromium).
# usage: bash docs/tensorboard_screenshot.sh RUN_DIR OUT.png
set -euo pipefail
run_dir=$1
out=$2
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m tensorboard.main --logdir "$run_dir" --host 127.0.0.1 --port "$port" --load_fast=false 2>/dev/null &
tb=$!
trap 'kill $tb' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/data/plugin/scalars/tags" | grep -q train/loss && break; sleep 1; done
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1400,1000 --virtual-time-budget=15000 --screenshot="$out" \
  "http://127.0.0.1:$port/#scalars&tagFilter=%5E(train%7Cval)%2F" 2>/dev/null
echo "wrote $out"
