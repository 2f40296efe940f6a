#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU (../shared/device/README.md): run it as one command there, e.g.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD CHESTXRAY_DATA=$PWD/.device/data PYTHONUNBUFFERED=1 \
#     && bash benchmarks/gpu_check.sh
# It writes small text files to $OUT (or outputs/gpu_check): the GPU's name, the epoch benchmark's GPU table
# (both pipelines and the model alone on the GPU, batch 4 and experiment=gpu_fast at batch 64), and the seconds
# from `python train.py trainer=gpu` to its first step and from its last epoch to exit. Try it on a CPU first with
#   DEVICE=cpu IMAGE_SIZE=32 bash benchmarks/gpu_check.sh
set -euo pipefail
out=${OUT:-outputs/gpu_check}
device=${DEVICE:-cuda}
size=${IMAGE_SIZE:-224}
data=${CHESTXRAY_DATA:?set CHESTXRAY_DATA to the dataset folder}
mkdir -p "$out"
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
  trainer=gpu
else
  echo cpu > "$out/gpu.txt"
  trainer=cpu
fi
python benchmarks/epoch_benchmark.py --device "$device" --data "$data" --image-size "$size" \
  --out "$out/epoch" > "$out/epoch_benchmark.md" 2> "$out/epoch_benchmark.log"
python benchmarks/startup.py --trainer "$trainer" --data "$data" --image-size "$size" > "$out/startup.md" \
  2> "$out/startup.log"
rm -rf "$out/epoch"
echo "wrote $out"
