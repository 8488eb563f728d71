#!/usr/bin/env bash
# The GPU figures in one short run: the bench at GPT-2 124M, context 1024, bfloat16 compute, at batch BATCH
# (default 16: estimated, not yet measured, to fit an 80 GB H100 in about 35 GB; an H200 has 141 GB) on one
# GPU, once per attention in ATTENTION (default "cudnn explicit": cuDNN's fused kernel, then the written-out
# one); then, on a machine with several GPUs, the data-parallel and FSDP meshes over all of them at BATCH rows
# per GPU. Each run prints one JSON object, after the GPUs' names. First, a parity check (one JSON object too): with
# every modern switch on (docs/modern.md: rotary, RMSNorm, QK-norm, SwiGLU, grouped KV heads, no biases, soft-cap),
# the loss and gradients of PARITY (default cudnn) equal the written-out attention's in bfloat16.
#
# On a lent GPU machine (the device tool): its image has jax with CUDA, flax, optax, orbax and tiktoken but
# not ml_collections, and nothing can be fetched there, so first, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml-collections==1.1.0
# then run `bash experiments/gpu_bench.sh` there, carrying `.whl`. It runs on a CPU too, e.g.
#   PYTHON=.venv/bin/python CONFIG=configs/tiny.py BATCH=2 ATTENTION=xla PARITY=xla bash experiments/gpu_bench.sh --steps=1
# Extra arguments go to `python -m mygpt_jax.bench` (see its --help).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# The fused attention against the written-out one with every switch on: rotary and QK-norm are applied before the
# fused call, grouped heads passed as such.
"$PYTHON" - "${PARITY:-cudnn}" <<'PARITY_EOF' || echo '{"parity": "failed"}'
import dataclasses, json, sys
import jax, jax.numpy as jnp, optax
from mygpt_jax import backends
from mygpt_jax.model import GPT, ModelConfig, init_params
cfg = ModelConfig(vocab_multiple=128, context_length=256, emb_dim=256, n_heads=4, n_layers=2, drop_rate=0.0,
                  dtype="bfloat16", position="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2,
                  bias=False, logit_softcap=15.0)
backend, params = backends.current(), init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (4, 257), 0, 50257)
def loss(attention, p):
    logits, _ = GPT(dataclasses.replace(cfg, attention=attention), backend).apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
(le, ge), (lf, gf) = (jax.jit(jax.value_and_grad(lambda p, a=a: loss(a, p)))(params) for a in ("explicit", sys.argv[1]))
diff = max(float(jnp.abs(a - b).max() / (jnp.abs(b).max() + 1e-12))
           for a, b in zip(jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(ge)))
print(json.dumps({"parity": sys.argv[1], "loss_explicit": float(le), "loss_fused": float(lf),
                  "max_relative_grad_diff": diff, "ok": abs(float(le - lf)) < 1e-2 and diff < 5e-2}))
PARITY_EOF
bench() {
  "$PYTHON" -m mygpt_jax.bench --config "${CONFIG:-configs/gpt2_124m.py}" --config.model.dtype=bfloat16 \
    --config.model.drop_rate=0.0 --steps=10 --json "$@" || echo "{\"args\": \"$*\", \"failed\": true}"
}
# One device (the mesh is 1 x 1 x 1), once per attention.
for attention in ${ATTENTION:-cudnn explicit}; do
  CUDA_VISIBLE_DEVICES=${ONE_GPU:-0} bench --config.model.attention="$attention" --config.train.batch_size="${BATCH:-16}" "$@"
done
# Every GPU, BATCH rows each: data parallel, then FSDP (train_tokens_per_s_per_device against the one-device run's).
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
if [ "${GPUS:-0}" -gt 1 ]; then
  for mesh in "--config.mesh.data=-1" "--config.mesh.data=1 --config.mesh.fsdp=-1"; do
    # shellcheck disable=SC2086
    bench --config.model.attention="${ATTENTION%% *}" --config.train.batch_size=$(( ${BATCH:-16} * GPUS )) $mesh "$@"
  done
fi
