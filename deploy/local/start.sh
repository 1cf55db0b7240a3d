#!/usr/bin/env bash
# Start the gateway, Redis and simulated vLLM engines on this machine, without Docker: background
# processes with pid files and logs in one run directory. Stop them with deploy/local/stop.sh.
#
#   deploy/local/start.sh                    # 2 short-pool + 1 long-pool engines, gateway on :8080
#   SHORT_REPLICAS=4 GATEWAY_PORT=9000 PYTHIA_POLICY=least_loaded deploy/local/start.sh
#
# Settings (environment): GATEWAY_PORT (8080), SIM_BASE_PORT (9001; engines take consecutive ports),
# SHORT_REPLICAS (2), LONG_REPLICAS (1), SHORT_MAX_CONTEXT (16384), LONG_MAX_CONTEXT (131072),
# PRESET (llama-3.1-8b-a100), MODEL (llama-3.1-8b), TIME_SCALE (1.0: as fast as the modelled GPU),
# REDIS (auto: use redis-server when installed; 0 = embedded predictor store), REDIS_PORT (6390),
# PYTHIA_LOCAL_DIR (run directory, default ${TMPDIR:-/tmp}/pythia-local), PYTHIA_BIN (the `pythia`
# command; default the repo's .venv), START_TIMEOUT_S (60). Any other PYTHIA_* variable reaches the
# gateway unchanged (PYTHIA_POLICY, PYTHIA_WORKERS, ...).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_DIR="${PYTHIA_LOCAL_DIR:-${TMPDIR:-/tmp}/pythia-local}"
GATEWAY_PORT="${GATEWAY_PORT:-8080}"
SIM_BASE_PORT="${SIM_BASE_PORT:-9001}"
SHORT_REPLICAS="${SHORT_REPLICAS:-2}"
LONG_REPLICAS="${LONG_REPLICAS:-1}"
SHORT_MAX_CONTEXT="${SHORT_MAX_CONTEXT:-16384}"
LONG_MAX_CONTEXT="${LONG_MAX_CONTEXT:-131072}"
PRESET="${PRESET:-llama-3.1-8b-a100}"
MODEL="${MODEL:-llama-3.1-8b}"
TIME_SCALE="${TIME_SCALE:-1.0}"
REDIS="${REDIS:-auto}"
REDIS_PORT="${REDIS_PORT:-6390}"
START_TIMEOUT_S="${START_TIMEOUT_S:-60}"

if [[ -n "${PYTHIA_BIN:-}" ]]; then
  PYTHIA=("${PYTHIA_BIN}")
elif [[ -x "${ROOT}/.venv/bin/pythia" ]]; then
  PYTHIA=("${ROOT}/.venv/bin/pythia")
elif command -v pythia >/dev/null; then
  PYTHIA=("$(command -v pythia)")
else
  echo "start.sh: no pythia command: run 'make venv' first, or set PYTHIA_BIN" >&2
  exit 1
fi

mkdir -p "${RUN_DIR}"
# shellcheck source=SCRIPTDIR/lib.sh
source "${ROOT}/deploy/local/lib.sh"

for pidfile in "${RUN_DIR}"/*.pid; do
  [[ -e "${pidfile}" ]] || continue
  if pid_alive "${pidfile}"; then
    echo "start.sh: already running ($(basename "${pidfile}" .pid), pid $(cat "${pidfile}")); stop it with: deploy/local/stop.sh ${RUN_DIR}" >&2
    exit 1
  fi
  rm -f "${pidfile}"
done

fail() {
  echo "start.sh: $1; last lines of $2:" >&2
  tail -n 20 "$2" >&2 || true
  "${ROOT}/deploy/local/stop.sh" "${RUN_DIR}" >&2 || true
  exit 1
}

# Refuse ports someone else holds: their /health would pass for ours.
for p in "${GATEWAY_PORT}" "${REDIS_PORT}" $(seq "${SIM_BASE_PORT}" $((SIM_BASE_PORT + SHORT_REPLICAS + LONG_REPLICAS - 1))); do
  if port_in_use 127.0.0.1 "${p}"; then
    echo "start.sh: port ${p} is already in use (set GATEWAY_PORT / SIM_BASE_PORT / REDIS_PORT)" >&2
    exit 1
  fi
done
# Redis: shared predictor state, as in production (the gateway works without it).
redis_url=""
if [[ "${REDIS}" != "0" ]] && command -v redis-server >/dev/null; then
  start_bg redis redis-server --port "${REDIS_PORT}" --bind 127.0.0.1 --save "" --appendonly no
  wait_tcp 127.0.0.1 "${REDIS_PORT}" "${START_TIMEOUT_S}" || fail "redis did not start on :${REDIS_PORT}" "${RUN_DIR}/redis.log"
  redis_url="redis://127.0.0.1:${REDIS_PORT}/0"
elif [[ "${REDIS}" == "1" ]]; then
  echo "start.sh: REDIS=1 but redis-server is not installed" >&2
  exit 1
fi

# Simulated engines: one process per replica, short pool first.
port="${SIM_BASE_PORT}"
short_urls=()
long_urls=()
engines=()  # name=url
start_engine() {  # POOL INDEX MAX_NUM_SEQS
  local name="sim-$1-$2" url="http://127.0.0.1:${port}"
  start_bg "${name}" "${PYTHIA[@]}" sim-engine --host 127.0.0.1 --port "${port}" --preset "${PRESET}" \
    --model "${MODEL}" --time-scale "${TIME_SCALE}" --scheduling-policy priority --max-num-seqs "$3" --seed "${port}"
  if [[ "$1" == short ]]; then short_urls+=("${url}"); else long_urls+=("${url}"); fi
  engines+=("${name}=${url}")
  port=$((port + 1))
}
for i in $(seq 1 "${SHORT_REPLICAS}"); do start_engine short "${i}" 256; done
for i in $(seq 1 "${LONG_REPLICAS}"); do start_engine long "${i}" 32; done
for engine in "${engines[@]}"; do
  wait_http "${engine#*=}/health" "${START_TIMEOUT_S}" "${engine%%=*}" ||
    fail "engine ${engine%%=*} (${engine#*=}) did not become healthy" "${RUN_DIR}/${engine%%=*}.log"
done

json_list() { local IFS=','; local quoted=(); for u in "$@"; do quoted+=("\"${u}\""); done; echo "[${quoted[*]}]"; }
pools="[{\"name\": \"short\", \"max_context_tokens\": ${SHORT_MAX_CONTEXT}, \"models\": [\"${MODEL}\"], \"replicas\": $(json_list "${short_urls[@]}")}"
if (( LONG_REPLICAS > 0 )); then
  pools+=", {\"name\": \"long\", \"max_context_tokens\": ${LONG_MAX_CONTEXT}, \"models\": [\"${MODEL}\"], \"replicas\": $(json_list "${long_urls[@]}")}"
fi
pools+="]"
echo "${pools}" >"${RUN_DIR}/pools.json"

PYTHIA_HOST=127.0.0.1 PYTHIA_PORT="${GATEWAY_PORT}" PYTHIA_POOLS="${RUN_DIR}/pools.json" \
  PYTHIA_REDIS_URL="${redis_url}" start_bg gateway "${PYTHIA[@]}" serve
wait_http "http://127.0.0.1:${GATEWAY_PORT}/ready" "${START_TIMEOUT_S}" gateway || fail "gateway did not become ready" "${RUN_DIR}/gateway.log"

cat <<MSG
Pythia is up (run directory ${RUN_DIR}: *.pid, *.log, pools.json)
  gateway  http://127.0.0.1:${GATEWAY_PORT}/v1   (metrics: /metrics)
  short    ${short_urls[*]}
  long     ${long_urls[*]:-none}
  redis    ${redis_url:-none (embedded predictor store)}
Try:   curl -s http://127.0.0.1:${GATEWAY_PORT}/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "${MODEL}", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}'
Stop:  deploy/local/stop.sh ${RUN_DIR}
MSG
