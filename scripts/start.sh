#!/usr/bin/env bash
# `npm start`: install what is missing, build, and run the daemon in the foreground with the
# embedded defaults (SQLite state and data in /var/lib/hyperfold, API on 127.0.0.1:8006).
# Extra arguments go to `hyperfold serve`, e.g. `npm start -- --data-dir /srv/hf --listen 0.0.0.0:8006`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data_args=()
serve_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) data_args=(--data-dir "$2"); shift 2 ;;
    --data-dir=*) data_args=(--data-dir "${1#*=}"); shift ;;
    *) serve_args+=("$1"); shift ;;
  esac
done
exec node dist/src/cli/main.js "${data_args[@]}" serve "${serve_args[@]}"
