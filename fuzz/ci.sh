#!/usr/bin/env bash
# CI's fuzzing step (.ci/run calls it after the tests): builds every target once, then runs each
# for FUZZ_SECONDS (default 60), two at a time on the two cores (FUZZ_JOBS); any crash fails.
# Seven targets take ceil(7/2) x 60 s = 4 min after the build (about 5 min with the two vendor
# API targets still to come), within the ~8 min CI can give it.
set -euo pipefail
cd "$(dirname "$0")"
export FUZZ_JOBS="${FUZZ_JOBS:-2}"
exec ./run.sh "${FUZZ_SECONDS:-60}" "$@"
