#!/usr/bin/env bash
# The CUDA tier: run it on a GPU machine before a change to code the GPU runs (model, training,
# losses, oracle, probes, meter, compilation, engine) lands. CI has no GPU.
#
#   scripts/gpu-check.sh --download [PYVER]   here, with a package index: wheels of what a bare GPU
#                                             machine lacks (pydantic and its parts) into .whl/
#   scripts/gpu-check.sh [--only tier|fullscale] [WORKDIR]
#                                             on the GPU machine: install what is missing from .whl/
#                                             (no network), install ablate, then run
#                                             1. the tests marked `cuda` (pytest -m cuda), and
#                                             2. scripts/fullscale_random.sh at full dimensions with
#                                                --set train.steps=200 and --memory-budget 16GiB (the
#                                                process held to a 16 GB card), to its report with exit 0.
# Its last line is `gpu-check: N passed, N failed` (each cuda test and the full run count as one).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5)

# Ray and what a bare GPU machine lacks of its requirements, for the tier's ray-executor test.
RAY_WHEELS=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1)

if [ "${1:-}" = "--download" ]; then
  pyver=${2:-3.12}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" "${RAY_WHEELS[@]}" || exit $?
  # ray's jars (Java workers, 33 MB) are not used from Python: repack the wheel without them
  python3 - .whl/ray-*.whl <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i.filename)) for i in src.infolist() if not i.filename.startswith("ray/jars/")]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True) if not l.startswith(b"ray/jars/"))
        dst.writestr(info, data)
PY
  ls -la .whl
  exit 0
fi

only=all
if [ "${1:-}" = "--only" ]; then only=${2:?tier or fullscale}; shift 2; fi
work=${1:-$(mktemp -d /tmp/gpu-check.XXXX)}
mkdir -p "$work"
passed=0 failed=0

# What a bare GPU machine lacks, from the repository's own files (no network there).
if ! python3 -c "import pydantic, ray" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu-check: pydantic or ray is missing and there is no .whl/ (run scripts/gpu-check.sh --download here first)"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 2
fi
if ! command -v ablate >/dev/null || ! python3 -c "import ablate_builtins" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 2
fi
python3 -c "import torch, sys; ok = torch.cuda.is_available(); print('gpu-check on', torch.cuda.get_device_name(0) if ok else 'NO CUDA DEVICE', '| torch', torch.__version__); sys.exit(0 if ok else 1)" || { echo "gpu-check: 0 passed, 1 failed"; exit 1; }

if [ "$only" = all ] || [ "$only" = tier ]; then
  python3 -m pytest -m cuda -p no:cacheprovider -q -rfEsP --junitxml="$work/cuda-tier.xml" tests/
  read -r p f < <(python3 - "$work/cuda-tier.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s[0]
    n, bad, skipped = (int(s.get(k, 0)) for k in ("tests", "failures", "skipped"))
    bad += int(s.get("errors", 0)) + skipped  # on a GPU machine a skipped cuda test is a failure
    print(n - bad, bad)
except Exception:
    print(0, 1)
PY
)
  passed=$((passed + p)) failed=$((failed + f))
fi

if [ "$only" = all ] || [ "$only" = fullscale ]; then
  # held to a 16 GB card's memory (--memory-budget: set_per_process_memory_fraction), as our users' cards are
  bash scripts/fullscale_random.sh "$work/fullscale" --set train.steps=200 \
    --set oracle.max_tokens="${GPU_CHECK_ORACLE_TOKENS:-4000000}" --memory-budget "${GPU_CHECK_MEMORY_BUDGET:-16GiB}" --quiet
  rc=$?
  if [ $rc -eq 0 ] && [ -s "$work/fullscale/reports/zeb139.md" ]; then
    passed=$((passed + 1)); echo "full-dimension ZEB-139 run: exit 0, report $work/fullscale/reports/zeb139.md"
  else
    failed=$((failed + 1)); echo "full-dimension ZEB-139 run: FAILED (exit $rc)"
  fi
fi
echo "gpu-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
