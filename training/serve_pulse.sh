#!/usr/bin/env bash
# Serve PULSE-7B (converted to the Hugging Face LLaVA-NeXT layout) with vLLM's OpenAI-compatible API.
#
# vLLM needs a GPU and its own Python environment (it pins its own torch/transformers; see
# ../shared/STACK.md), so it runs as a separate service and rag-ecg talks to it over HTTP
# (`python cli.py report IMAGE --backend vllm`). Full walk-through: docs/serving.md.
#
#   training/serve_pulse.sh /models/pulse-7b-hf                  # 1 GPU, port 8000
#   PORT=9000 TP=2 training/serve_pulse.sh /models/pulse-7b-hf   # 2 GPUs (tensor parallel)
#   LORA=/runs/lora-rag/adapter training/serve_pulse.sh /models/pulse-7b-hf   # + a LoRA adapter
#
# Environment knobs (defaults in brackets):
#   VLLM        the vllm executable [vllm] (e.g. /opt/vllm-env/bin/vllm)
#   HOST, PORT  where to listen [127.0.0.1, 8000]; use HOST=0.0.0.0 only behind a firewall/proxy
#   NAME        served model name that clients send as `model` [pulse-7b]
#   TP          tensor-parallel GPUs [1]
#   MAX_LEN     context window in tokens [4096] (vicuna-7b's; an ECG page alone takes ~2,400 tokens)
#   MAX_SEQS    concurrent sequences for continuous batching [32]
#   GPU_UTIL    fraction of GPU memory vLLM may take [0.90]
#   DTYPE       weight/activation dtype [bfloat16]
#   API_KEY     require this bearer key from clients [none]
#   LORA        a LoRA adapter folder from training/finetune_llm.py, served as model "$NAME-lora" [none];
#               needs a vLLM whose LlavaNextForConditionalGeneration supports LoRA (vllm-project/vllm#49788,
#               merged 2026-07-25; older releases stop at start with "does not support LoRA yet": serve the
#               run's merged/ checkpoint instead, see docs/serving.md)
#   LORA_RANK   the adapter's rank for --max-lora-rank [64]
#
# rag-ecg's vllm client reads MAX_LEN back from GET /v1/models and fits each prompt into it (docs/serving.md).
set -euo pipefail

MODEL_DIR="${1:?usage: training/serve_pulse.sh CONVERTED_MODEL_DIR (see training/convert_pulse.py)}"
shift || true
VLLM="${VLLM:-vllm}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
NAME="${NAME:-pulse-7b}"
TP="${TP:-1}"
MAX_LEN="${MAX_LEN:-4096}"
MAX_SEQS="${MAX_SEQS:-32}"
GPU_UTIL="${GPU_UTIL:-0.90}"
DTYPE="${DTYPE:-bfloat16}"

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "serve_pulse: $MODEL_DIR has no config.json; convert PULSE-7B first:" >&2
  echo "  python training/convert_pulse.py /models/PULSE-7B $MODEL_DIR" >&2
  exit 2
fi
if grep -q '"llava_llama"' "$MODEL_DIR/config.json"; then
  echo "serve_pulse: $MODEL_DIR is still in the original LLaVA layout; run training/convert_pulse.py" >&2
  exit 2
fi
TEMPLATE="$MODEL_DIR/chat_template.jinja"
if [[ ! -f "$TEMPLATE" ]]; then
  echo "serve_pulse: $TEMPLATE missing (training/convert_pulse.py writes it)" >&2
  exit 2
fi
if ! command -v "$VLLM" >/dev/null 2>&1; then
  echo "serve_pulse: '$VLLM' not found; install vLLM in its own environment (pip install vllm) and set VLLM=" >&2
  exit 2
fi

args=(
  serve "$MODEL_DIR"
  --served-model-name "$NAME"
  --host "$HOST" --port "$PORT"
  --dtype "$DTYPE"
  --tensor-parallel-size "$TP"
  --max-model-len "$MAX_LEN"
  --max-num-seqs "$MAX_SEQS"
  --gpu-memory-utilization "$GPU_UTIL"
  --chat-template "$TEMPLATE"
  --limit-mm-per-prompt '{"image": 1}'
  --generation-config vllm
)
if [[ -n "${API_KEY:-}" ]]; then
  args+=(--api-key "$API_KEY")
fi
if [[ -n "${LORA:-}" ]]; then
  [[ -f "$LORA/adapter_config.json" ]] || { echo "serve_pulse: LORA=$LORA has no adapter_config.json" >&2; exit 2; }
  echo "serve_pulse: LoRA on LLaVA-NeXT needs vLLM with vllm-project/vllm#49788 (2026-07); if it stops with" \
       "'does not support LoRA yet', serve the merged checkpoint (finetune's merged/) instead" >&2
  args+=(--enable-lora --max-lora-rank "${LORA_RANK:-64}" --lora-modules "$NAME-lora=$LORA")
fi

echo "serve_pulse: $VLLM ${args[*]} $*" >&2
exec "$VLLM" "${args[@]}" "$@"
