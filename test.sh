#!/usr/bin/env bash
# Run the test suite from the project virtualenv (created on first use).
#
#     ./test.sh [pytest options]        e.g.  ./test.sh -x -q -k logistic
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/scripts/bootstrap.sh"
cd "$ROOT"

rc=0
"$ROOT/.venv/bin/python" -m pytest tests "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "sparkgd: error: pytest collected no tests (exit code 5); treating that as a failure" >&2
    exit 1
fi
exit "$rc"
