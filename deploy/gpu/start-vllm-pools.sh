#!/usr/bin/env bash
# Start real vLLM pools on one GPU host: one `vllm serve` per GPU, each pool with its own
# --max-model-len (its context-length class) and --max-num-seqs, prefix caching and priority
# scheduling on; then print the PYTHIA_POOLS JSON that points the gateway at them.
#
#   deploy/gpu/start-vllm-pools.sh                       # all GPUs: 1/4 (at least 1) long, the rest short
#   GPUS=0,1,2,3 LONG_GPUS=1 MODEL=meta-llama/Llama-3.1-8B-Instruct deploy/gpu/start-vllm-pools.sh
#   deploy/gpu/start-vllm-pools.sh --dry-run             # print the commands and PYTHIA_POOLS only
#   deploy/local/stop.sh "${TMPDIR:-/tmp}/pythia-vllm"   # stop them
#
# Settings (environment): MODEL (Hugging Face id or local path, meta-llama/Llama-3.1-8B-Instruct),
# SERVED_MODEL_NAME (llama-3.1-8b: the name clients send), GPUS (comma list; default all that
# nvidia-smi lists), LONG_GPUS (GPUs for the long pool), SHORT_MAX_MODEL_LEN (16384),
# LONG_MAX_MODEL_LEN (131072), SHORT_MAX_NUM_SEQS (256), LONG_MAX_NUM_SEQS (32),
# GPU_MEMORY_UTILIZATION (0.92), BASE_PORT (8001; one port per GPU), ADVERTISE_HOST (address the
# gateway uses to reach this host; default the first address of `hostname -I`), VLLM_BIN (vllm),
# EXTRA_VLLM_ARGS (appended to every command), RUN_DIR (${TMPDIR:-/tmp}/pythia-vllm),
# START_TIMEOUT_S (1200: weights download and CUDA graph capture take minutes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

MODEL="${MODEL:-meta-llama/Llama-3.1-8B-Instruct}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-llama-3.1-8b}"
SHORT_MAX_MODEL_LEN="${SHORT_MAX_MODEL_LEN:-16384}"
LONG_MAX_MODEL_LEN="${LONG_MAX_MODEL_LEN:-131072}"
SHORT_MAX_NUM_SEQS="${SHORT_MAX_NUM_SEQS:-256}"
LONG_MAX_NUM_SEQS="${LONG_MAX_NUM_SEQS:-32}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.92}"
BASE_PORT="${BASE_PORT:-8001}"
VLLM_BIN="${VLLM_BIN:-vllm}"
EXTRA_VLLM_ARGS="${EXTRA_VLLM_ARGS:-}"
RUN_DIR="${RUN_DIR:-${TMPDIR:-/tmp}/pythia-vllm}"
START_TIMEOUT_S="${START_TIMEOUT_S:-1200}"

if [[ -z "${GPUS:-}" ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "start-vllm-pools.sh: nvidia-smi not found; set GPUS=0,1,... explicitly" >&2
    exit 1
  fi
  GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
fi
IFS=',' read -r -a gpu_list <<<"${GPUS}"
n_gpus=${#gpu_list[@]}
if ((n_gpus == 0)); then
  echo "start-vllm-pools.sh: no GPUs" >&2
  exit 1
fi
# One GPU: a short pool only (a long pool would need the whole GPU for few sequences).
default_long=$((n_gpus >= 2 ? (n_gpus / 4 > 0 ? n_gpus / 4 : 1) : 0))
LONG_GPUS="${LONG_GPUS:-${default_long}}"
if ((LONG_GPUS >= n_gpus)); then
  echo "start-vllm-pools.sh: LONG_GPUS=${LONG_GPUS} leaves no GPU for the short pool (${n_gpus} GPUs)" >&2
  exit 1
fi
ADVERTISE_HOST="${ADVERTISE_HOST:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
ADVERTISE_HOST="${ADVERTISE_HOST:-127.0.0.1}"

mkdir -p "${RUN_DIR}"
# shellcheck source=../local/lib.sh
source "${ROOT}/deploy/local/lib.sh"

short_urls=()
long_urls=()
names=()
for i in "${!gpu_list[@]}"; do
  gpu="${gpu_list[$i]}"
  port=$((BASE_PORT + i))
  if ((i < n_gpus - LONG_GPUS)); then
    pool=short max_len="${SHORT_MAX_MODEL_LEN}" max_seqs="${SHORT_MAX_NUM_SEQS}"
    short_urls+=("http://${ADVERTISE_HOST}:${port}")
  else
    pool=long max_len="${LONG_MAX_MODEL_LEN}" max_seqs="${LONG_MAX_NUM_SEQS}"
    long_urls+=("http://${ADVERTISE_HOST}:${port}")
  fi
  # The flags that matter for Pythia: see docs/operations.md ("Sizing pools per context class").
  cmd=("${VLLM_BIN}" serve "${MODEL}" --served-model-name "${SERVED_MODEL_NAME}" --host 0.0.0.0 --port "${port}"
    --enable-prefix-caching --max-model-len "${max_len}" --scheduling-policy priority
    --max-num-seqs "${max_seqs}" --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION}")
  # shellcheck disable=SC2206  # EXTRA_VLLM_ARGS is a list of words on purpose
  cmd+=(${EXTRA_VLLM_ARGS})
  name="vllm-${pool}-gpu${gpu}"
  names+=("${name}=${port}")
  if ((DRY_RUN)); then
    echo "CUDA_VISIBLE_DEVICES=${gpu} ${cmd[*]}"
  else
    if pid_alive "${RUN_DIR}/${name}.pid"; then
      echo "start-vllm-pools.sh: ${name} already runs (pid $(cat "${RUN_DIR}/${name}.pid"))" >&2
      exit 1
    fi
    if port_in_use 127.0.0.1 "${port}"; then
      echo "start-vllm-pools.sh: port ${port} is in use (set BASE_PORT)" >&2
      exit 1
    fi
    CUDA_VISIBLE_DEVICES="${gpu}" start_bg "${name}" "${cmd[@]}"
  fi
done

if ((!DRY_RUN)); then
  command -v "${VLLM_BIN}" >/dev/null || echo "start-vllm-pools.sh: warning: ${VLLM_BIN} not on PATH (pip install -e '.[gpu]')" >&2
  for entry in "${names[@]}"; do
    name="${entry%%=*}"
    echo "waiting for ${name} on :${entry#*=} (log: ${RUN_DIR}/${name}.log)" >&2
    if ! wait_http "http://127.0.0.1:${entry#*=}/health" "${START_TIMEOUT_S}" "${name}"; then
      echo "start-vllm-pools.sh: ${name} did not become healthy; last lines of its log:" >&2
      tail -n 30 "${RUN_DIR}/${name}.log" >&2 || true
      "${ROOT}/deploy/local/stop.sh" "${RUN_DIR}" >&2 || true
      exit 1
    fi
  done
fi

json_list() { local IFS=','; local quoted=(); for u in "$@"; do quoted+=("\"${u}\""); done; echo "[${quoted[*]}]"; }
pools="[{\"name\": \"short\", \"max_context_tokens\": ${SHORT_MAX_MODEL_LEN}, \"models\": [\"${SERVED_MODEL_NAME}\"], \"replicas\": $(json_list "${short_urls[@]}")}"
if ((LONG_GPUS > 0)); then
  pools+=", {\"name\": \"long\", \"max_context_tokens\": ${LONG_MAX_MODEL_LEN}, \"models\": [\"${SERVED_MODEL_NAME}\"], \"replicas\": $(json_list "${long_urls[@]}")}"
fi
pools+="]"
((DRY_RUN)) || echo "${pools}" >"${RUN_DIR}/pools.json"
echo "# the gateway's pools (also in ${RUN_DIR}/pools.json):" >&2
echo "PYTHIA_POOLS='${pools}'"
