# shellcheck shell=bash
# Helpers shared by deploy/local/*.sh and deploy/gpu/*.sh (sourced; expects RUN_DIR to be set).
# Every process started here has RUN_DIR/<name>.pid, RUN_DIR/<name>.log and RUN_DIR/<name>.cmd.

# start_bg NAME CMD...: run CMD in the background, detached from the terminal, logging to NAME.log.
start_bg() {
  local name="$1"
  shift
  printf '%s ' "$@" >"${RUN_DIR}/${name}.cmd"
  nohup "$@" >"${RUN_DIR}/${name}.log" 2>&1 </dev/null &
  echo "$!" >"${RUN_DIR}/${name}.pid"
}

# pid_alive PIDFILE: true when the process it names still runs (and is not a zombie).
pid_alive() {
  local pid
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  [[ "$(ps -o stat= -p "${pid}" 2>/dev/null)" != Z* ]]
}

# port_in_use HOST PORT: true when something already accepts connections there.
port_in_use() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# wait_http URL TIMEOUT_S [NAME]: poll until URL answers 200, or give up after TIMEOUT_S seconds;
# with NAME, also give up as soon as that process (RUN_DIR/NAME.pid) has exited.
wait_http() {
  local url="$1" deadline=$((SECONDS + $2)) name="${3:-}"
  while ((SECONDS < deadline)); do
    if [[ -n "${name}" ]] && ! pid_alive "${RUN_DIR}/${name}.pid"; then
      return 1
    fi
    if command -v curl >/dev/null; then
      curl -fsS -o /dev/null --max-time 2 "${url}" 2>/dev/null && return 0
    else
      python3 -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" "${url}" 2>/dev/null && return 0
    fi
    sleep 0.2
  done
  return 1
}

# wait_tcp HOST PORT TIMEOUT_S: poll until a TCP connect succeeds.
wait_tcp() {
  local deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
