#!/usr/bin/env bash
# Run the end-to-end suites of the two Xen hosts at once against the running lab: one pytest per host
# (`--lab-host`, see tests/e2e/conftest.py), each emulated host busy on its own CPU core. Lines are prefixed with
# the host and printed as they come; each run's whole log is kept in tests/output/e2e-<host>.log.
# Exit status: non-zero when either run failed.
# usage: PYTEST="python -m pytest" tests/e2e/run-per-host.sh [pytest args...]
set -u
cd "$(dirname "$0")/../.."
PYTEST=${PYTEST:-python -m pytest}
mkdir -p tests/output
pids=()
for h in xen1 xen2; do
  ( set -o pipefail
    $PYTEST -v --durations=15 -m e2e --lab-host "$h" "$@" tests/e2e 2>&1 \
      | tee "tests/output/e2e-$h.log" | sed -u "s/^/[$h] /" ) &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || rc=1
done
# The end of the output is what a CI page shows: repeat each run's failures (pytest's short summary) and result.
for h in xen1 xen2; do
  grep -E '^(FAILED|ERROR) ' "tests/output/e2e-$h.log" | sed "s/^/[$h] /"
  echo "[$h] $(tail -n 1 "tests/output/e2e-$h.log")"
done
exit $rc
