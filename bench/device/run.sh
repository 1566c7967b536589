#!/usr/bin/env bash
# There (the lent GPU machine, from the repo root the device tool copied): install the carried
# wheels (bench/device/prepare.sh made them) into /tmp/site, then run the GPU suite from the bare
# checkout with the carried record store when there is one, its arguments passed through. The JSON (written after every section, so a run stopped
# at its limit keeps what it finished) and the log go to $OUT, which comes back.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
out="${OUT:-bench/results}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
store=()
if [ -f .whl/records_sm90.json.gz ]; then          # prepare.sh's records: launched, not compiled here
    store=(--records .whl/records_sm90.json.gz)
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
python3 bench/gpu_suite.py --out "$out/gpu_suite.json" ${store[@]+"${store[@]}"} "$@" 2>&1 \
    | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
