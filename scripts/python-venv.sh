#!/usr/bin/env bash
# Creates (or refreshes) the Python virtualenv with the vendor SDKs the facade tests drive:
# boto3 (AWS IoT Secure Tunneling) and alibabacloud_iot20180120 (Alibaba IoT), pinned in
# tests/vendor/requirements.txt. The tests find its interpreter at $IOTUNNEL_PYTHON, by default
# /var/tmp/iotunnel-venv/bin/python, and fail when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${IOTUNNEL_VENV:-/var/tmp/iotunnel-venv}"
req=tests/vendor/requirements.txt
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
echo "python-venv: vendor SDKs installed in $venv"
