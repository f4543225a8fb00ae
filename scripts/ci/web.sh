#!/usr/bin/env bash
# CI step: the portable form in a real browser (tests/web). Installs what those tests need, then runs
# them and fails if they would skip: Debian's chromium (apt), onnxruntime-web (npm ci, pinned by
# tests/web/package-lock.json) and the playwright Python package (its driver only; no browser
# download). Expects .venv from scripts/test.sh (creates it otherwise). About 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error)
.venv/bin/python -m pip install -q "playwright==1.65.*"
ONNX_SAP_WEB_REQUIRED=1 .venv/bin/pytest -q -rs tests/web
