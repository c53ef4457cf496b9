#!/usr/bin/env bash
# `make prefect-up`: a local Prefect server on 127.0.0.1:$PREFECT_PORT (SQLite database under .prefect/) and
# `python -m pipeline.serve` (the finetune deployments), each started in a session of its own so that
# prefect_down.sh stops it together with every process it started (flow runs, dvc, training).
# Writes .prefect/server.pid, .prefect/serve.pid and .prefect/env (`source .prefect/env` sets PREFECT_API_URL);
# logs go to .prefect/server.log and .prefect/serve.log.
# Environment: PREFECT_PORT (default 4200), PYTHON (default .venv/bin/python, else python), PREFECT_UP_TIMEOUT
# (seconds to wait for each process, default 120).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
STATE="$REPO/.prefect"
HOST=127.0.0.1
PORT=${PREFECT_PORT:-4200}
API="http://$HOST:$PORT/api"
TIMEOUT=${PREFECT_UP_TIMEOUT:-120}
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x .venv/bin/python ]] && PYTHON="$REPO/.venv/bin/python"
fi

mkdir -p "$STATE"
export PREFECT_HOME="$STATE"
export PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE/prefect.db"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=1

alive() {  # alive NAME: the process in .prefect/NAME.pid runs
    [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null
}

answers() {  # answers URL: a GET of URL returns 200
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" >/dev/null 2>&1
}

start() {  # start NAME COMMAND...: a new session (its process group id is its PID), output to .prefect/NAME.log
    local name=$1
    shift
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

fail() {  # fail NAME MESSAGE: say why with the end of NAME's log, stop whatever was started, exit 1
    echo "prefect-up: $2; the end of $STATE/$1.log:" >&2
    tail -n 20 "$STATE/$1.log" >&2
    scripts/prefect_down.sh >&2
    exit 1
}

wait_until() {  # wait_until NAME URL: until URL answers; fails when NAME's process exits or TIMEOUT passes
    local deadline=$((SECONDS + TIMEOUT))
    until answers "$2"; do
        alive "$1" || fail "$1" "$1 exited"
        ((SECONDS <= deadline)) || fail "$1" "$2 did not answer within ${TIMEOUT}s"
        sleep 1
    done
}

if alive server || alive serve; then
    echo "prefect-up: already running (PIDs in $STATE/*.pid); make prefect-down first to restart" >&2
    exit 1
fi
if answers "$API/health"; then
    echo "prefect-up: another server answers on $HOST:$PORT; set PREFECT_PORT to a free port" >&2
    exit 1
fi

start server "$PYTHON" -m prefect server start --host "$HOST" --port "$PORT"
wait_until server "$API/health"
echo "prefect-up: server $API up (PID $(cat "$STATE/server.pid"))"

export PREFECT_API_URL="$API"
start serve "$PYTHON" -m pipeline.serve
wait_until serve "$API/deployments/name/finetune/retrain"
echo "prefect-up: deployments served (PID $(cat "$STATE/serve.pid"))"

echo "export PREFECT_API_URL=$API" >"$STATE/env"
cat <<MSG
prefect-up: ready. UI: http://$HOST:$PORT
  source .prefect/env
  prefect deployment run finetune/demo --watch
  make prefect-down    # stops both processes and everything they started
MSG
