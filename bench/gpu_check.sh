#!/usr/bin/env bash
# One GPU check of what the CPU machines cannot run, with a throughput line for each step (< 10 min):
#   1. vLLM in its own venv (it pins its own torch/transformers), serving a tiny LLaVA-NeXT built from config
#      in that venv (or a converted PULSE-7B folder given as $1) through training/serve_pulse.sh;
#   2. `cli.py review` of N_CHARTS real PTB-XL charts with --backend vllm (context budget from the server,
#      schema-constrained answers) -> charts/s;
#   3. the pixel encoder recipe (training/configs/encoder_gpu.yaml) for a few optimizer steps on CUDA -> steps/s;
#   4. a faiss-gpu index (exact and IVF-PQ, 200k x 512 clustered vectors, rag_ecg.search.vector_index) -> queries/s.
# Each step that fails prints one line `gpu_check: FAILED <step>: <why> (log: FILE)` and the script stops.
#
#   bench/gpu_check.sh                       # tiny LLaVA-NeXT
#   bench/gpu_check.sh /models/pulse-7b-hf   # a real PULSE-7B (training/convert_pulse.py output)
#
# Environment knobs (defaults in brackets):
#   PY         the project's python (its venv: pip install -e .) [.venv/bin/python, else python3]
#   DATA       the shared data folder with ptbxl/ [../shared/data]
#   WORK       scratch folder (venvs, model, store, runs, logs) [/tmp/rag-ecg-gpu-check]
#   VLLM       an existing vllm executable: skips the install [none]
#   VLLM_SPEC  what pip installs into $WORK/vllm-venv [vllm]
#   WHEELS     a folder of wheels: vllm and faiss-gpu are installed from it, offline (--no-index) [none]
#   PORT       vLLM port [8011]; N_CHARTS charts reviewed [20]; STEPS encoder optimizer steps [20]
#   GPU_UTIL   share of GPU memory vLLM may take [0.5]; PULSE-7B needs ~16 GB of it (bf16 weights + cache)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL_ARG="${1:-}"
DATA="${DATA:-$ROOT/../shared/data}"
WORK="${WORK:-/tmp/rag-ecg-gpu-check}"
PORT="${PORT:-8011}"
N_CHARTS="${N_CHARTS:-20}"
STEPS="${STEPS:-20}"
VLLM_SPEC="${VLLM_SPEC:-vllm}"
if [[ -z "${PY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
mkdir -p "$WORK/logs"
STEP="start"
LOG="$WORK/logs/gpu_check.log"
SERVER_PID=""
T0=$SECONDS

fail() {  # one line naming the step, why, and the log to read
  echo "gpu_check: FAILED $STEP: $* (log: $LOG)" >&2
  [[ -f "$LOG" ]] && tail -n 15 "$LOG" >&2
  exit 1
}
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'fail "command failed at line $LINENO"' ERR
step() {  # start a step with its own log
  STEP="$1"
  LOG="$WORK/logs/$2.log"
  : >"$LOG"
  echo "gpu_check: [$((SECONDS - T0))s] $STEP" >&2
}
pip_from() {  # pip install with python $1, offline from $WHEELS when given
  local py="$1"; shift
  if [[ -n "${WHEELS:-}" ]]; then
    "$py" -m pip install -q --no-index --find-links "$WHEELS" "$@"
  else
    "$py" -m pip install -q "$@"
  fi
}

# ------------------------------------------------------------------------------------------------ preflight
step "preflight" preflight
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this check needs an NVIDIA GPU"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >>"$LOG" 2>&1 || fail "nvidia-smi sees no GPU"
"$PY" -c "import rag_ecg, torch; assert torch.cuda.is_available(), 'torch sees no GPU'" >>"$LOG" 2>&1 \
  || fail "$PY cannot import rag_ecg with a CUDA torch (install the project: pip install -e . with a CUDA torch)"
[[ -f "$DATA/ptbxl/ptbxl_database.csv" ]] || fail "no PTB-XL under $DATA (set DATA=)"
command -v curl >/dev/null || fail "curl not found (used to wait for the server)"
echo "gpu_check: GPU $(head -n 1 "$LOG")" >&2

# ------------------------------------------------------------------------------------------------ vLLM
step "install vLLM" vllm_install
if [[ -n "${VLLM:-}" ]]; then
  [[ -x "$VLLM" ]] || fail "VLLM=$VLLM is not an executable"
  VPY="$(dirname "$VLLM")/python"
else
  VENV="$WORK/vllm-venv"
  if [[ ! -x "$VENV/bin/vllm" ]]; then
    python3 -m venv "$VENV" >>"$LOG" 2>&1 || fail "cannot create a venv at $VENV"
    pip_from "$VENV/bin/python" "$VLLM_SPEC" >>"$LOG" 2>&1 \
      || fail "pip could not install '$VLLM_SPEC' (no network? give WHEELS=folder of wheels, or VLLM=path)"
  fi
  VLLM="$VENV/bin/vllm"
  VPY="$VENV/bin/python"
fi
"$VLLM" --version >>"$LOG" 2>&1 || fail "$VLLM does not run"
echo "gpu_check: vllm $(tail -n 1 "$LOG")" >&2

step "model" model
if [[ -n "$MODEL_ARG" ]]; then
  MODEL_DIR="$MODEL_ARG"
  [[ -f "$MODEL_DIR/config.json" ]] || fail "$MODEL_DIR has no config.json (convert PULSE-7B with training/convert_pulse.py)"
  EXTRA_SERVE=()
else
  # built with vLLM's own transformers, so vLLM reads the files it wrote; head sizes of 64 suit its kernels
  MODEL_DIR="$WORK/tiny-llava-next"
  PYTHONPATH="$ROOT" "$VPY" - "$MODEL_DIR" >>"$LOG" 2>&1 <<'PYEOF' || fail "building the tiny LLaVA-NeXT in vLLM's venv failed"
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from training.chat_template import CHAT_TEMPLATE
from training.tiny_llava import GRID_PINPOINTS, IMAGE_SIZE, PATCH_SIZE, build_processor

out = Path(sys.argv[1])
proc = build_processor()
tok = proc.tokenizer
vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                          image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
text = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_grid_pinpoints=GRID_PINPOINTS, vision_feature_select_strategy="default",
                      vision_feature_layer=-2)
torch.manual_seed(0)
LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
proc.save_pretrained(out)
(out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
print("tiny LLaVA-NeXT:", out)
PYEOF
  EXTRA_SERVE=(--enforce-eager)  # no CUDA-graph capture: the tiny model starts in seconds
fi

step "serve" serve
VLLM="$VLLM" PORT="$PORT" MAX_LEN=4096 GPU_UTIL="${GPU_UTIL:-0.5}" NAME=gpu-check \
  training/serve_pulse.sh "$MODEL_DIR" ${EXTRA_SERVE[@]+"${EXTRA_SERVE[@]}"} >>"$LOG" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "vllm serve exited while starting"
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/models" >"$WORK/models.json" || fail "vllm serve did not answer within 300 s"
echo "gpu_check: serving $(cat "$WORK/models.json")" >&2

# ------------------------------------------------------------------------------------------------ review
step "store + index for the review" index
DB="sqlite:///$WORK/store.db"
"$PY" cli.py ingest ptbxl "$DATA/ptbxl" --db "$DB" --limit 400 >>"$LOG" 2>&1 || fail "ingest of PTB-XL failed"
"$PY" - "$WORK" "$DB" >>"$LOG" 2>&1 <<'PYEOF' || fail "building the reference index failed"
import sys
import time
from pathlib import Path

from index.build import BuildConfig, build_index
from rag_ecg.data.store import open_store
from rag_ecg.encoder.model import ECGEncoder

work, db = Path(sys.argv[1]), sys.argv[2]
try:  # the encoder shipped in the package; a random tiny one where this checkout has none
    from rag_ecg.encoder.shipped import default_encoder
    encoder = default_encoder()
except Exception as exc:  # noqa: BLE001 - any reason there is none: say it, index with a tiny random encoder
    print(f"no shipped encoder ({exc}); a random ecg-clip-tiny instead")
    encoder = work / "tiny-encoder"
    ECGEncoder.create("ecg-clip-tiny").save(encoder)
t0 = time.perf_counter()
build_index(open_store(db), encoder, name="gpu-check", out_dir=work / "index", cfg=BuildConfig(workers=8),
            progress=False)
print(f"index built in {time.perf_counter() - t0:.1f}s with {encoder}")
PYEOF

step "review $N_CHARTS charts with --backend vllm" review
CHARTS="$WORK/charts"
rm -rf "$CHARTS" "$WORK/review"
mkdir -p "$CHARTS"
"$PY" - "$DATA/ptbxl" "$CHARTS" "$N_CHARTS" >>"$LOG" 2>&1 <<'PYEOF' || fail "rendering the charts failed"
import sys
from pathlib import Path

from rag_ecg.data.records import read_wfdb
from rag_ecg.paper.render import render_page

src, out, n = Path(sys.argv[1]) / "records100", Path(sys.argv[2]), int(sys.argv[3])
for hea in sorted(src.glob("*.hea"))[-n:]:  # the last records: fold 9/10 rows, not in the 400 ingested
    render_page(read_wfdb(hea.with_suffix("")), preset="photo", seed=0, dpi=100).save(out / f"{hea.stem}.jpg")
PYEOF
cat >"$WORK/reader.yaml" <<EOF
backend: vllm
options:
  base_url: http://127.0.0.1:$PORT/v1
  timeout_s: 120
  max_retries: 1
EOF
if [[ -f "$MODEL_DIR/tokenizer.json" ]]; then  # count prompts with the model's own tokenizer and image grid
  echo "  tokenizer: $MODEL_DIR" >>"$WORK/reader.yaml"
fi
start=$SECONDS
"$PY" cli.py review "$CHARTS" --out "$WORK/review" --db "$DB" --index "$WORK/index" \
  --backend-config "$WORK/reader.yaml" --workers 8 >>"$LOG" 2>&1 || fail "review with --backend vllm failed"
grep -q " 0 pending" "$LOG" || fail "review left charts pending"
echo "gpu_check: review: $(grep -m1 'charts:' "$LOG"); $(grep -m1 'this run:' "$LOG") [$((SECONDS - start)) s]"
cleanup  # the GPU memory vLLM holds goes back before the encoder trains
SERVER_PID=""

# ------------------------------------------------------------------------------------------------ encoder
step "pixel encoder: $STEPS steps on CUDA" encoder
start=$SECONDS
"$PY" cli.py train-encoder --config training/configs/encoder_gpu.yaml --db "$DB" --set "max_steps=$STEPS" \
  --set epochs=1 --set "run_dir=$WORK/encoder-run" --set workers=8 --set eval_workers=8 --set log_every=5 \
  --set val_every=1000 --set "eval_presets=[clean]" >>"$LOG" 2>&1 || fail "encoder training on CUDA failed"
took=$((SECONDS - start))
echo "gpu_check: encoder: $STEPS steps of batch 128 in ${took}s ($(awk -v s="$STEPS" -v t="$took" 'BEGIN{printf "%.2f", s/(t>0?t:1)}') steps/s, rendering included)"

# ------------------------------------------------------------------------------------------------ faiss-gpu
step "faiss-gpu index" faiss
FAISS_DIR="$WORK/faiss-gpu"
if ! "$PY" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" >>"$LOG" 2>&1; then
  [[ -d "$FAISS_DIR/faiss" ]] || pip_from "$PY" --target "$FAISS_DIR" "faiss-gpu==1.15.1" >>"$LOG" 2>&1 \
    || fail "cannot install faiss-gpu==1.15.1 (no network? WHEELS=)"
fi
PYTHONPATH="$FAISS_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" - >>"$LOG" 2>&1 <<'PYEOF' || fail "the faiss-gpu benchmark failed"
import time

import faiss
import numpy as np

from rag_ecg.search.index_config import IndexConfig
from rag_ecg.search.vector_index import build

assert faiss.get_num_gpus() > 0, "faiss sees no GPU"
rng = np.random.default_rng(0)
centres = rng.normal(size=(2000, 512)).astype(np.float32)
x = centres[rng.integers(0, 2000, 200_000)] + 0.3 * rng.normal(size=(200_000, 512)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
q = x[rng.choice(200_000, 2000, replace=False)]
for kind in ("flat", "ivfpq"):
    t0 = time.perf_counter()
    idx = build(np.arange(len(x)), x, IndexConfig(kind=kind, device="gpu"))
    built = time.perf_counter() - t0
    idx.search(q[:10], 10)  # the GPU replica is made on the first search
    t0 = time.perf_counter()
    _, ids = idx.search(q, 10)
    dt = time.perf_counter() - t0
    print(f"FAISS {kind}: built in {built:.1f}s, {len(q) / dt:,.0f} queries/s (k=10, on GPU: {idx.on_gpu})")
PYEOF
grep "^FAISS" "$LOG" | sed 's/^/gpu_check: /'

STEP="done"
echo "gpu_check: all steps passed in $((SECONDS - T0)) s"
