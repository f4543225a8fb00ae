#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite. Tests that need a GPU skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# pytest (not `python -m pytest`): the tests import the installed package, op library included.
.venv/bin/pytest -q -rs "$@"
