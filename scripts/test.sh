#!/usr/bin/env bash
# Type-check imgworker (mypy, configured in setup.cfg), then run the whole test suite.
# Arguments go to pytest.
source "$(dirname "$0")/_env.sh" test
if ! .venv/bin/python -m mypy; then
  echo "test.sh: mypy found type errors (above); fix them before the tests run" >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
