#!/usr/bin/env bash
# Here (no GPU): get what the GPU suite needs on the lent H200 that its image lacks into the ignored
# folder .whl/ that the device call carries: wheels, and the suite's AOT records for sm_90. The image has python3 3.12 with torch, triton
# 3.6, onnx, onnxruntime, onnxscript, safetensors, click, einops; it lacks flash-linear-attention
# (the prefill aim compares against its chunk_gated_delta_rule). TensorRT cannot travel (its wheels
# exceed the 64 MiB a call carries), so the suite's trt section reports it missing there.
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude=.git/info/exclude
if [ -d .git ] && ! grep -qx '/.whl/' "$exclude" 2>/dev/null; then
    echo '/.whl/' >> "$exclude"
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl fla-core==0.6.0
# every AOT record the suite's AOT, AOT timing and plugin sections launch on an H200 (sm_90), compiled
# here by the pinned triton: the PTX the TensorRT plugin ships, and no compile time on the lent GPU
python3 bench/gpu_suite.py --prepare-records .whl/records_sm90.json.gz --cc 90
ls -l .whl
echo 'device call: run(command="bash bench/device/run.sh --sections aot_timing,aot,plugin,jit,timing --quick",'
echo '             carry=[".whl"], timeout_s=570); results come back as gpu_suite.json and gpu_suite.log'
