#!/bin/sh
# SyftBox entry point and the project's command line.
#   ./run.sh            run the app (what SyftBox does): member, plus aggregator on the aggregator's datasite;
#                       a supervisor in Python (shared/host/supervisor.py) keeps it running, restarts it into new code,
#                       and stops it when its SyftBox client is gone
#   ./run.sh demo       a whole local SyftBox network on 127.0.0.1 with the app installed in every client
#   ./run.sh test       the whole test suite (pytest arguments may follow)
#   ./run.sh bench      the benchmarks
#   ./run.sh env [runtime|test]   build (once) and print the path of that environment
# It prepares its own Python environment, shared by every copy of the app on this machine and keyed by the
# dependency pins in pyproject.toml, so a second start takes seconds. The app runs from this folder
# (PYTHONPATH), never from a copy installed in the shared environment.
set -eu
APP_DIR=$(cd "$(dirname "$0")" && pwd)
cd "$APP_DIR"

# SyftBox strips pyenv/conda/venv entries from PATH; resolve Python the same way in every context so that
# the app, the demo and the tests share one environment. Fall back to the full PATH if that finds no 3.11+.
find_python() {
    for p in $(printf '%s' "$1" | tr ':' ' '); do
        for name in python3.13 python3.12 python3.11 python3; do
            if [ -x "$p/$name" ] && "$p/$name" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                echo "$p/$name"; return 0
            fi
        done
    done
    return 1
}
CLEAN_PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -v -e pyenv -e conda -e 'env/bin' | paste -sd: -)
PY=$(find_python "$CLEAN_PATH") || PY=$(find_python "$PATH") || {
    echo "cpu_tracker: needs Python 3.11+ with venv (Debian: apt-get install python3 python3-venv)" >&2
    sleep 60; exit 1
}

# Two environments, each keyed by its own pins: "runtime" holds what the app runs (what SyftBox starts, and the
# demo); "test" adds the test extra (pytest, hypothesis, selenium, ...) for `test` and `bench`.
ENV_ROOT=${CPU_TRACKER_ENV_ROOT:-${SYFTBOX_CPU_TRACKER_ENV_ROOT:-${HOME:-/tmp}/.cache/cpu_tracker}}
mkdir -p "$ENV_ROOT"

# ensure_env runtime|test: sets ENV to a ready environment with that kind's pins, building it once per machine.
ensure_env() {
    REQS=$("$PY" - "$1" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + (p["optional-dependencies"]["test"] if sys.argv[1] == "test" else [])))
PYEOF
)
    KEY=$(printf '%s\n%s\n' "$("$PY" -c 'import sys; print(sys.version)')" "$REQS" | sha256sum | cut -c1-16)
    ENV="$ENV_ROOT/env-$KEY"
    [ -f "$ENV/.ready" ] && return 0
    (
        flock 9
        if [ ! -f "$ENV/.ready" ]; then
            echo "cpu_tracker: preparing the $1 Python environment in $ENV (once per machine)"
            rm -rf "$ENV"
            printf '%s\n' "$REQS" > "$ENV_ROOT/requirements-$KEY.txt"
            if command -v uv >/dev/null 2>&1; then
                uv venv -q --python "$PY" "$ENV" && uv pip install -q --python "$ENV/bin/python" -r "$ENV_ROOT/requirements-$KEY.txt"
            else
                "$PY" -m venv "$ENV" && "$ENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ENV_ROOT/requirements-$KEY.txt"
            fi || { echo "cpu_tracker: installing dependencies failed; will retry" >&2; rm -rf "$ENV"; exit 1; }
            touch "$ENV/.ready"
        fi
    ) 9>"$ENV_ROOT/.lock" || { sleep 30; exit 1; }
}

case "${1:-}" in
    test|bench) ensure_env test ;;
    env)        ensure_env "${2:-runtime}" ;;
    *)          ensure_env runtime ;;
esac
touch "$ENV/.used" 2>/dev/null || true  # shared.host.envs removes an env nothing has used for a week

export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
case "${1:-}" in
    demo)  shift; exec "$ENV/bin/python" -m tests.localnet.demo "$@" ;;
    test)  shift; exec "$ENV/bin/python" -m pytest "$@" ;;
    bench) shift; exec "$ENV/bin/python" -m tests.bench "$@" ;;
    env)   echo "$ENV" ;;
    "")    exec "$ENV/bin/python" -m shared.host.runner cpu_tracker_member.member cpu_tracker_aggregator.aggregator ;;
    *)     echo "usage: ./run.sh [demo|test|bench|env] [args...]" >&2; exit 2 ;;
esac
