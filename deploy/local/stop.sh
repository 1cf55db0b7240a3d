#!/usr/bin/env bash
# Stop what deploy/local/start.sh (or deploy/gpu/start-vllm-pools.sh) started: every process with a
# pid file in the run directory gets SIGTERM (the gateway drains in-flight streams), then SIGKILL
# after STOP_TIMEOUT_S (default 40). The gateway stops first, then the engines, then Redis.
#
#   deploy/local/stop.sh [RUN_DIR]     # default ${PYTHIA_LOCAL_DIR:-${TMPDIR:-/tmp}/pythia-local}
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="${1:-${PYTHIA_LOCAL_DIR:-${TMPDIR:-/tmp}/pythia-local}}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-40}"
# shellcheck source=SCRIPTDIR/lib.sh
source "${ROOT}/deploy/local/lib.sh"

if [[ ! -d "${RUN_DIR}" ]]; then
  echo "stop.sh: nothing to stop (${RUN_DIR} does not exist)"
  exit 0
fi

# stop_one PIDFILE: SIGTERM, wait, SIGKILL if it is still there; removes the pid file.
stop_one() {
  local pidfile="$1" name pid deadline
  name="$(basename "${pidfile}" .pid)"
  if ! pid_alive "${pidfile}"; then
    rm -f "${pidfile}"
    return 0
  fi
  pid="$(cat "${pidfile}")"
  kill -TERM "${pid}" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT_S))
  while pid_alive "${pidfile}" && ((SECONDS < deadline)); do sleep 0.1; done
  if pid_alive "${pidfile}"; then
    echo "stop.sh: ${name} (pid ${pid}) ignored SIGTERM for ${STOP_TIMEOUT_S}s: SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
  fi
  rm -f "${pidfile}"
  echo "stopped ${name} (pid ${pid})"
}

# 1. the clients' entry point, 2. every engine in parallel, 3. Redis.
[[ -e "${RUN_DIR}/gateway.pid" ]] && stop_one "${RUN_DIR}/gateway.pid"
waits=()
for f in "${RUN_DIR}"/*.pid; do
  [[ -e "${f}" && "${f}" != "${RUN_DIR}/redis.pid" ]] || continue
  stop_one "${f}" &
  waits+=("$!")
done
for w in "${waits[@]}"; do wait "${w}" || true; done
[[ -e "${RUN_DIR}/redis.pid" ]] && stop_one "${RUN_DIR}/redis.pid"
exit 0
