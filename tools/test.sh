#!/usr/bin/env bash
# Install everything (tools/setup.sh), lint, then run the whole test suite.
# Extra arguments go to pytest, e.g.  tools/test.sh -k expandable -x
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
tools/setup.sh
export PATH="$here/.venv/bin:/usr/bin:$PATH"
echo "== ruff"
ruff check .
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit $rc
