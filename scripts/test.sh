#!/usr/bin/env bash
# Run the whole test suite. Arguments go to pytest.
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m pytest "$@"
