#!/usr/bin/env bash
# `npm test`: the whole suite. Unit tests (pure logic, fake QMP server) and integration tests
# (real QEMU under TCG with the tiny image). Installs what it lacks first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HYPERFOLD_TEST_CACHE="${HYPERFOLD_TEST_CACHE:-/var/cache/hyperfold-test}"
# Build the tiny image once for every integration test (they hard-link it into their data dirs).
node dist/test/helpers/prepare.js
shopt -s nullglob globstar
unit=(dist/test/unit/**/*.test.js)
integration=(dist/test/integration/**/*.test.js)
if [ "$#" -gt 0 ]; then
  exec node --test --test-reporter=spec "$@"
fi
echo "== ${#unit[@]} unit and ${#integration[@]} integration test files"
exec node --test --test-reporter=spec --test-concurrency=2 --test-timeout=600000 "${unit[@]}" "${integration[@]}"
