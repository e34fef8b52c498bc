#!/usr/bin/env bash
# Run imgworker on embedded defaults and print the report. Arguments go to `imgworker demo`.
source "$(dirname "$0")/_env.sh" demo
exec .venv/bin/python -m imgworker demo "$@"
