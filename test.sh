#!/usr/bin/env bash
# Run the test suite from the project virtualenv (created on first use).
#
#     ./test.sh [pytest options]        e.g.  ./test.sh -x -q -k logistic
#
# Two pytest processes: tests/ with one classic local[2] session, then tests/connect
# with one Spark Connect session (a Connect session puts pyspark into Connect mode for
# its whole process). Options go to both; the exit status is the first failure's.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
cd "$ROOT"

NARGS=$#

# pytest "$@" in the directory $1; exit code 5 (no tests collected) is a failure for
# the whole suite, not when the caller's -k/-m selected none in one half
suite() {
    local where=$1 rc=0
    shift
    "$ROOT/.venv/bin/python" -m pytest "$where" "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        if [[ $NARGS -eq 0 ]]; then
            echo "sparkgd: error: pytest collected no tests in $where (exit code 5); treating that as a failure" >&2
            return 1
        fi
        return 0
    fi
    return "$rc"
}

rc=0
suite tests "$@" || rc=$?
rc2=0
SPARKGD_CONNECT_TESTS=1 suite tests/connect "$@" || rc2=$?
if [[ $rc -ne 0 ]]; then
    exit "$rc"
fi
exit "$rc2"
