"""The full set of config keys with their defaults, and the checks of their values.

Every `configs/*.py` starts from `base_config()` and changes values. The base comes locked (ml_collections):
setting a key it does not define fails on that line of the config file, and `overrides.load_config` checks
each value's type against the default's, so every config has the same keys, each of its default's type.

`validate(config)` runs one check function per section (`VALIDATORS`); a new section adds its function there.
"""

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from mygpt_jax.errors import ConfigError
from mygpt_jax.tokenizer import VOCAB_SIZE


def _locked(build: Callable[[], ml_collections.ConfigDict]) -> Callable[[], ml_collections.ConfigDict]:
    """`build()`'s config, locked: a key it does not define cannot be added, in a config file or anywhere."""

    @functools.wraps(build)
    def locked() -> ml_collections.ConfigDict:
        config = build()
        config.lock()
        return config

    return locked


@_locked
def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_name = "default"
    c.checkpoint_dir = "checkpoints"
    # Start training from pretrained weights ("gpt2_124m", ...) instead of a random init; "" = random.
    c.init_from = ""
    # A folder that already holds GPT-2's weights, OpenAI's 7 files or a Hugging Face model (config.json +
    # model.safetensors; any GPT-2 shape); "" = find or download them into checkpoint_dir.
    c.weights_dir = ""
    # The GPT-2 this config samples from ("124M", ...; "" = a training run's own checkpoint).
    c.pretrained = ""
    # Where GPT-2's weights come from, tried in order (comma-separated): "hub", the Hugging Face Hub's
    # safetensors (hub_url, hub_revision), and "openai", OpenAI's TensorFlow files (weights_urls). A copy
    # already on disk (in checkpoint_dir, or the Hugging Face cache) is used first, in the same order.
    c.weights_sources = "hub,openai"
    # Where OpenAI's files are downloaded from, tried in order (comma-separated base URLs).
    c.weights_urls = ("https://openaipublic.blob.core.windows.net/gpt-2/models,"
                      "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
    # The Hugging Face Hub or a mirror of it; "" = $HF_ENDPOINT (as huggingface_hub reads it), else huggingface.co.
    c.hub_url = ""
    # The commit of openai-community/gpt2* to download; "" = the one pinned in mygpt_jax/pretrained/download.py.
    c.hub_revision = ""
    # Compiled XLA programs kept between commands (jax's persistent compilation cache), so that running a
    # command again loads its train step or decoding loop instead of compiling it; "" = off. Programs that
    # compiled faster than compilation_cache_min_seconds are not kept.
    c.compilation_cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mygpt_jax", "xla")
    c.compilation_cache_min_seconds = 0.1

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 50257
    m.context_length = 256
    m.emb_dim = 768
    m.n_heads = 12
    m.n_layers = 12
    m.drop_rate = 0.1
    m.qkv_bias = False
    m.tie_embeddings = False
    # The compute dtype (parameters are always float32): float32, bfloat16 or float16; "auto" = the backend's
    # (docs/backends.md: float32 on CPUs and Apple GPUs, bfloat16 on NVIDIA/AMD GPUs and TPUs).
    m.dtype = "auto"
    m.init_scheme = "gpt2"  # "gpt2": N(0, init_std); "pytorch": torch's nn.Linear/nn.Embedding defaults
    m.init_std = 0.02  # std of the normal init of weights in the "gpt2" scheme
    m.remat = False  # rematerialise each block in the backward pass (saves memory on long contexts)
    # "explicit": attention written out (dropout on the attention weights, the KV cache); "cudnn": cuDNN's
    # fused kernel through jax.nn.dot_product_attention (NVIDIA GPUs, 16-bit dtype); "xla": that function's
    # XLA lowering. The last two run passes without a KV cache (training, evaluation) and need drop_rate 0.
    # "auto" = the backend's where drop_rate is 0 (cudnn on NVIDIA GPUs that have it), else explicit.
    m.attention = "auto"
    # Pad the token embedding and the LM head to a multiple of this many rows (1 = off: 50257; 128 = nanoGPT's
    # 50304), for mesh.tensor to split them and for speed; padding rows are never predicted nor exported.
    m.vocab_multiple = 1
    # Since GPT-2 (docs/modern.md); each default is GPT-2's. Positions: "learned" (GPT-2's table) or "rope" (rotary
    # embeddings of q and k, half-split convention, base rope_base; needs an even head dimension).
    m.position = "learned"
    m.rope_base = 10000.0
    m.norm = "layernorm"  # or "rmsnorm"
    m.norm_scale = True  # the norms' learnable gain (False: none, as nanochat)
    m.qk_norm = False  # RMS-normalise queries and keys per head before the scores
    # The MLP: "gelu" (GPT-2), "relu2" (ReLU squared) or "swiglu" (gated; hidden width 8 d / 3 rounded to the
    # nearest multiple of 8, as many weights as the 4 d MLP).
    m.mlp = "gelu"
    m.n_kv_heads = 0  # key/value heads, a divisor of n_heads (grouped-query attention; a smaller KV cache); 0 = n_heads
    # Biases of the dense layers and LayerNorms, except q/k/v's own (qkv_bias, set apart: bias=False and
    # qkv_bias=True is Qwen's layout).
    m.bias = True
    m.logit_softcap = 0.0  # > 0: logits = c * tanh(logits / c) (Gemma 2, modded-nanogpt: 15 to 30); 0 = off
    m.zero_init_proj = False  # attention's and the MLP's output projections start at zero (under either init_scheme)

    # The devices as a (data, fsdp, tensor) mesh (docs/scaling.md): data splits the batch (throughput), fsdp the
    # batch and the parameters and optimizer state (memory), tensor the MLP, heads and vocabulary (very wide
    # models). -1 = the devices the other two leave; the default puts every device on data.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # Several processes (hosts) of one run, joined by jax.distributed before anything else touches JAX. A single
    # process never initializes it.
    c.distributed = g = ml_collections.ConfigDict()
    g.coordinator_address = ""  # host:port of process 0, e.g. 10.0.0.1:1234
    g.num_processes = 1
    g.process_id = 0
    g.auto = False  # take all three from the cluster's environment (SLURM, TPU pods, Open MPI), as jax detects them
    g.timeout_s = 600  # for the processes to find each other, and for each collective (a slow compile included)

    c.data = d = ml_collections.ConfigDict()
    # What to train on: "" = the bundled "The Verdict"; a text file; a folder (every data.glob file below it); a
    # glob ("books/*.txt"); record files (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet: one record one document,
    # docs/corpora.md); or a folder prepared before (train.bin, val.bin, meta.json). Tokenized once into
    # <data.cache_dir>/<name>-<hash>/ (python -m mygpt_jax.prepare, or the first training).
    d.path = ""
    d.glob = "**/*.txt"  # the files of a folder, relative to it ("**/" recurses)
    d.exclude = ""  # comma-separated patterns of relative paths to leave out ("*" matches across folders: "test/*")
    # A single file's first train_ratio of characters trains and the rest validates; in a folder each file goes
    # to one split by the hash of its path (adding a file never moves another).
    d.train_ratio = 0.9
    d.stride = 0  # epochs: windows start every stride tokens; 0 = context_length (non-overlapping windows)
    # "epochs": shuffled windows, epoch after epoch (train.num_epochs); "random": windows at random offsets,
    # drawn from (train.seed, step), for train.max_steps steps.
    d.sampling = "epochs"
    d.cache_dir = ""  # where prepared corpora go; "" = <checkpoint_dir>/data
    # How a folder's documents are split: "auto" = each file (or record) to one split by the hash of its path (and
    # index), each document's tail when that leaves a split shorter than one window; "tails" = the last
    # (1 - train_ratio) of every document's tokens validates (shares exactly as asked, on a folder of few files).
    d.split = "auto"
    d.text_field = "text"  # the field of a record (.jsonl, .jsonl.gz, .jsonl.zst, .json, .parquet) that holds its text
    # > 0: a prefix of the corpus, its documents in file order up to the one that reaches this many tokens
    # ("the first 1B tokens of FineWeb-Edu": 1_000_000_000); part of the prepared folder's name and fingerprint.
    d.max_tokens = 0
    d.workers = 0  # tokenizer threads when preparing; 0 = every core
    # Resume a run although its corpus changed since the checkpoint (else that stops with one line).
    d.allow_changes = False

    c.train = t = ml_collections.ConfigDict()
    t.num_epochs = 10
    t.batch_size = 2
    t.learning_rate = 4e-4
    t.weight_decay = 0.1
    # Which parameters weight decay shrinks: "all" (the seed's torch AdamW over model.parameters()) or
    # "matrices", the weights and embeddings but not biases and LayerNorm (GPT-2 and nanoGPT practice).
    t.weight_decay_params = "all"
    t.beta1 = 0.9
    t.beta2 = 0.999
    t.eps = 1e-8
    t.warmup_steps = 0  # > 0 turns on linear warmup followed by cosine decay
    t.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
    t.grad_clip = 0.0  # > 0 clips the global gradient norm
    t.grad_accum_steps = 1
    t.eval_freq = 5
    t.eval_iter = 5
    t.seed = 123
    # False starts afresh, moving the earlier run (checkpoints and records) into <run>/previous/<timestamp>/.
    t.resume = True
    # > 0 resumes from this update's checkpoint instead of the newest, moving the newer ones into previous/ (after
    # a damaged checkpoint, or to go back before a divergence).
    t.resume_step = 0
    t.checkpoint_every = 50  # steps; a checkpoint is also written at the end and on Ctrl-C
    t.max_to_keep = 2
    # True writes each checkpoint in the background (Orbax's asynchronous save) while the next steps run; the loop
    # waits only for the copy to host memory. docs/performance.md has what it saves on the verdict run.
    t.async_checkpoint = False
    t.sample_every_epoch = True  # data.sampling="epochs": a greedy sample of sample.prompt after each epoch
    t.sample_every = 0  # > 0: a greedy sample of sample.prompt every this many steps
    t.max_steps = 0  # > 0 stops after this many steps; data.sampling="random" trains exactly this many
    t.tensorboard = False  # also write TensorBoard event files to <run>/tensorboard (the tensorboard extra)
    # The progress display and metrics.jsonl give achieved FLOP/s as a fraction of a GPU's peak, or on a CPU of
    # jnp.dot's rate on square matrices of this side, measured at start (about a second); 0 skips it.
    t.flops_matmul_size = 2048
    # "adamw", or "muon": Muon (momentum orthogonalised by Newton-Schulz; docs/modern.md) for the attention and MLP
    # weight matrices, AdamW (the keys above) for the embeddings, the head, biases and gains. Both follow the
    # warmup and cosine schedule above.
    t.optimizer = "adamw"
    t.muon_learning_rate = 0.02
    # Muon's decoupled weight decay; optax multiplies it by muon_learning_rate (~50x AdamW's), hence 0 by default.
    t.muon_weight_decay = 0.0
    t.muon_momentum = 0.95  # Nesterov momentum of Muon's gradient average
    t.muon_ns_steps = 5  # Newton-Schulz iterations
    t.muon_ns_coeffs = "3.4445,-4.7750,2.0315"  # their quintic's coefficients a,b,c (Keller Jordan's)

    c.sample = s = ml_collections.ConfigDict()
    s.prompt = "Every effort moves you"  # "" = interactive chat
    s.temperature = 0.0  # 0 = greedy
    s.top_k = 0  # 0 = off
    s.top_p = 1.0  # 1.0 = off
    s.max_new_tokens = 50
    s.num_samples = 1
    s.seed = 123
    # "device": the whole decoding loop on the device (lax.while_loop); "host": one jitted step per token called
    # from Python; "auto" = the backend's (host on Apple GPUs, whose while_loop has crashed; device elsewhere).
    s.decode_loop = "auto"

    c.eval = e = ml_collections.ConfigDict()
    e.text_file = ""  # the text evaluate reads; "" = the bundled verdict
    e.split = ""  # "train" or "val": evaluate that split of the config's corpus (data.path) instead
    e.json = False
    e.batch_size = 4
    # A split (eval.split) is scored on the windows every evaluation of the run scores (train.eval_iter batches of
    # train.batch_size, data.stride, data.sampling), so its loss is the one the run logged; True scores every
    # token once instead (a different number). A text file (eval.text_file) is always scored whole.
    e.all_tokens = False

    c.export = x = ml_collections.ConfigDict()
    # The folder `python -m mygpt_jax.export` writes the model into, for transformers' from_pretrained.
    x.dir = ""
    # Export into a folder that holds other files (not an earlier export), replacing what it holds.
    x.overwrite = False

    # python -m mygpt_jax.serve: the OpenAI-compatible completions server (docs/serving.md).
    c.serve = v = ml_collections.ConfigDict()
    v.host = "127.0.0.1"  # the address it listens on; 0.0.0.0 = every interface (no authentication)
    v.port = 8000  # 0 = a free port the system picks (printed once ready)
    v.max_batch = 8  # sequences decoded together by the one compiled step (the KV cache has this many rows)
    v.max_queue = 64  # sequences waiting for a row; a request that would exceed it is answered 429 (Retry-After)
    v.max_n = 8  # the largest `n` (completions per prompt) a request may ask for
    v.drain_s = 30.0  # on Ctrl-C/SIGTERM: seconds requests in flight may take to finish before they are cut off
    v.model_name = ""  # the model id of the API (/v1/models, a request's `model`); "" = run_name
    v.cors_origins = ""  # origins allowed to call the API from a browser, comma-separated ("*" = any); "" = none
    v.request_timeout_s = 600.0  # a request still running after this long is cut off (queueing included)
    return c


# Folders of checkpoint_dir that are not runs: prepared corpora, OpenAI's weights, the sweeps.
RESERVED_FOLDERS = ("data", "gpt2", "experiments")


def run_folder(config: ml_collections.ConfigDict) -> str:
    """Where a run lives: <checkpoint_dir>/<run_name>/."""
    return os.path.join(config.checkpoint_dir, config.run_name)


def get_value(config: ml_collections.ConfigDict, key: str) -> Any:
    """config.<dotted key>."""
    return functools.reduce(lambda node, name: node[name], key.split("."), config)


def require(c: ml_collections.ConfigDict, ok: bool, key: str, what: str) -> None:
    """A ConfigError naming `key`, its value and `what` it must be, unless `ok`."""
    if not ok:
        raise ConfigError(f"--config.{key}={get_value(c, key)!r} is invalid: {what}")


def _validate_model(c: ml_collections.ConfigDict) -> None:
    m = c.model
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        require(c, m[key] > 0, f"model.{key}", "must be a positive integer")
    require(c, m.vocab_multiple >= 1, "model.vocab_multiple", "must be >= 1 (1 = no padding)")
    require(c, m.vocab_size >= VOCAB_SIZE, "model.vocab_size",
            f"the GPT-2 tokenizer's ids go up to {VOCAB_SIZE - 1}, so it must be at least {VOCAB_SIZE}")
    require(c, m.emb_dim % m.n_heads == 0, "model.emb_dim", f"must be divisible by model.n_heads={m.n_heads}")
    require(c, 0.0 <= m.drop_rate < 1.0, "model.drop_rate", "must be in [0, 1)")
    require(c, m.init_scheme in ("gpt2", "pytorch"), "model.init_scheme", "use gpt2 or pytorch")
    require(c, m.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
            "use auto, float32, bfloat16 or float16")
    require(c, m.attention in ("auto", "explicit", "cudnn", "xla"), "model.attention",
            "use auto, explicit, cudnn or xla")
    require(c, m.attention in ("auto", "explicit") or m.drop_rate == 0.0, "model.attention",
            f"fused attention has no dropout on the attention weights; set --config.model.drop_rate=0.0 "
            f"(now {m.drop_rate}) or --config.model.attention=explicit")
    require(c, m.attention != "cudnn" or m.dtype != "float32", "model.attention",
            "cuDNN's fused attention runs in 16 bits; add --config.model.dtype=bfloat16")


def _validate_mesh(c: ml_collections.ConfigDict) -> None:
    for axis in ("data", "fsdp", "tensor"):
        require(c, c.mesh[axis] == -1 or c.mesh[axis] >= 1, f"mesh.{axis}", "must be a positive size, or -1 (the "
                "devices the other axes leave)")


def _validate_distributed(c: ml_collections.ConfigDict) -> None:
    g = c.distributed
    require(c, g.num_processes >= 1, "distributed.num_processes", "must be >= 1")
    require(c, 0 <= g.process_id < g.num_processes, "distributed.process_id",
            f"must be in [0, distributed.num_processes={g.num_processes})")
    require(c, g.num_processes == 1 or g.auto or ":" in g.coordinator_address, "distributed.coordinator_address",
            "several processes need the host:port of process 0")
    require(c, g.timeout_s > 0, "distributed.timeout_s", "must be positive")


def _validate_data(c: ml_collections.ConfigDict) -> None:
    d = c.data
    require(c, 0.0 < d.train_ratio < 1.0, "data.train_ratio", "must be between 0 and 1")
    require(c, d.stride >= 0, "data.stride", "must be >= 0 (0 means context_length)")
    require(c, d.sampling in ("epochs", "random"), "data.sampling", "use epochs or random")
    require(c, d.sampling == "epochs" or c.train.max_steps > 0, "train.max_steps",
            "data.sampling=random trains for train.max_steps steps: set it > 0")
    require(c, d.workers >= 0, "data.workers", "must be >= 0 (0 = every core)")
    require(c, bool(d.glob), "data.glob", "must be a pattern such as **/*.txt")
    require(c, d.split in ("auto", "tails"), "data.split", "use auto or tails")
    require(c, bool(d.text_field), "data.text_field", "must name the field that holds a record's text, e.g. text")
    require(c, d.max_tokens >= 0, "data.max_tokens", "must be >= 0 (0 = the whole corpus)")


def _validate_train(c: ml_collections.ConfigDict) -> None:
    t = c.train
    for key in ("num_epochs", "batch_size", "eval_freq", "eval_iter", "grad_accum_steps", "checkpoint_every",
                "max_to_keep"):
        require(c, t[key] > 0, f"train.{key}", "must be a positive integer")
    require(c, t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
            f"must divide train.batch_size={t.batch_size}")
    require(c, t.learning_rate > 0, "train.learning_rate", "must be positive")
    require(c, t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(c, t.weight_decay_params in ("all", "matrices"), "train.weight_decay_params", "use all or matrices")
    require(c, t.seed >= 0, "train.seed", "must be >= 0")
    require(c, 0.0 <= t.beta1 < 1.0, "train.beta1", "must be in [0, 1)")
    require(c, 0.0 <= t.beta2 < 1.0, "train.beta2", "must be in [0, 1)")
    require(c, t.eps > 0, "train.eps", "must be positive")
    require(c, t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0 (0 = no warmup)")
    require(c, 0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    require(c, t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping)")
    require(c, t.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no limit)")
    require(c, t.sample_every >= 0, "train.sample_every", "must be >= 0 (0 = off)")
    require(c, t.flops_matmul_size >= 0, "train.flops_matmul_size", "must be >= 0 (0 skips the measurement)")
    require(c, t.resume_step >= 0, "train.resume_step", "use an update with a checkpoint, or 0 for the newest")


def _validate_sample(c: ml_collections.ConfigDict) -> None:
    s = c.sample
    require(c, s.temperature >= 0, "sample.temperature", "must be >= 0 (0 = greedy)")
    require(c, s.top_k >= 0, "sample.top_k", "must be >= 0 (0 = off)")
    require(c, 0.0 < s.top_p <= 1.0, "sample.top_p", "must be in (0, 1]")
    require(c, s.max_new_tokens > 0, "sample.max_new_tokens", "must be positive")
    require(c, s.num_samples > 0, "sample.num_samples", "must be positive")
    require(c, s.decode_loop in ("auto", "device", "host"), "sample.decode_loop", "use auto, device or host")


def _validate_eval(c: ml_collections.ConfigDict) -> None:
    require(c, c.eval.batch_size > 0, "eval.batch_size", "must be positive")
    require(c, c.eval.split in ("", "train", "val"), "eval.split", "use train, val or \"\" (eval.text_file)")


def _validate_run(c: ml_collections.ConfigDict) -> None:
    """Where a run lives and where its weights and compiled programs come from."""
    require(c, bool(c.run_name) and "/" not in c.run_name, "run_name", "must be a non-empty name without '/'")
    require(c, c.run_name not in RESERVED_FOLDERS, "run_name",
            f"{', '.join(RESERVED_FOLDERS)} are folders of checkpoint_dir that hold other things; choose another name")
    require(c, bool(c.checkpoint_dir.strip()), "checkpoint_dir",
            "it is the folder of every run and prepared corpus; name one (\".\" for the current folder)")
    require(c, c.compilation_cache_min_seconds >= 0, "compilation_cache_min_seconds", "must be >= 0")
    sources = c.weights_sources.split(",")
    require(c, set(sources) <= {"hub", "openai"} and len(set(sources)) == len(sources),
            "weights_sources", "use hub and/or openai, comma-separated, each once")


def _validate_serve(c: ml_collections.ConfigDict) -> None:
    v = c.serve
    require(c, 0 <= v.port <= 65535, "serve.port", "must be a TCP port (0 = a free one)")
    require(c, bool(v.host), "serve.host", "must be an address such as 127.0.0.1")
    require(c, v.max_batch >= 1, "serve.max_batch", "must be a positive number of rows")
    require(c, v.max_queue >= 0, "serve.max_queue", "must be >= 0")
    require(c, v.max_n >= 1, "serve.max_n", "must be >= 1")
    require(c, v.drain_s >= 0, "serve.drain_s", "must be >= 0 seconds")
    require(c, v.request_timeout_s > 0, "serve.request_timeout_s", "must be positive")


# The model keys that change the parameters' shapes or names: a checkpoint (or pretrained weights) trains on only
# with the same values (train.py's fine-tuning checks).
MODEL_SHAPE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings",
                    "vocab_multiple", "position", "norm", "norm_scale", "mlp", "n_kv_heads", "bias")


# The switches of the modern recipe (docs/modern.md) at GPT-2's values: the bench's and the sweep's baseline.
GPT2_SWITCHES = {"model.position": "learned", "model.norm": "layernorm", "model.norm_scale": True,
                 "model.qk_norm": False, "model.mlp": "gelu", "model.n_kv_heads": 0, "model.bias": True,
                 "model.logit_softcap": 0.0, "model.zero_init_proj": False, "train.optimizer": "adamw"}


def _validate_switches(c: ml_collections.ConfigDict) -> None:
    """The switches of the modern recipe (docs/modern.md) and Muon's keys: one line naming the keys at fault."""
    m, t = c.model, c.train
    choices = {"position": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu")}
    for key, allowed in choices.items():
        if m[key] not in allowed:
            raise ConfigError(f"--config.model.{key}={m[key]!r} is invalid: use {' or '.join(allowed)}")
    problems = [
        (m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads), f"--config.model.n_heads={m.n_heads} is "
         f"not a multiple of --config.model.n_kv_heads={m.n_kv_heads}: each key/value head serves a whole group"),
        (m.position == "rope" and m.n_heads > 0 and (m.emb_dim // m.n_heads) % 2, f"--config.model.position=rope "
         f"rotates pairs of dimensions, and --config.model.emb_dim={m.emb_dim} / --config.model.n_heads={m.n_heads} "
         "gives an odd head dimension"),
        (m.rope_base <= 0, f"--config.model.rope_base={m.rope_base} must be positive"),
        (m.logit_softcap < 0, f"--config.model.logit_softcap={m.logit_softcap} must be >= 0 (0 = off)"),
        (t.optimizer not in ("adamw", "muon"), f"--config.train.optimizer={t.optimizer!r} is invalid: use adamw or "
         "muon"),
        (t.muon_learning_rate <= 0, f"--config.train.muon_learning_rate={t.muon_learning_rate} must be positive"),
        (t.muon_weight_decay < 0, f"--config.train.muon_weight_decay={t.muon_weight_decay} must be >= 0"),
        (not 0 <= t.muon_momentum < 1, f"--config.train.muon_momentum={t.muon_momentum} must be in [0, 1)"),
        (t.muon_ns_steps < 1, f"--config.train.muon_ns_steps={t.muon_ns_steps} must be >= 1"),
        (len(_numbers(t.muon_ns_coeffs)) != 3, f"--config.train.muon_ns_coeffs={t.muon_ns_coeffs!r} must be 3 numbers "
         "a,b,c"),
        (c.init_from and gpt2_lacks(m), f"--config.init_from={c.init_from} loads GPT-2's weights, which have no "
         f"{', '.join(gpt2_lacks(m))}; start from a random init (--config.init_from=\"\") or use GPT-2's values"),
    ]
    for bad, line in problems:
        if bad:
            raise ConfigError(line)


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        return []


def muon_ns_coeffs(t: ml_collections.ConfigDict) -> tuple[float, float, float]:
    """train.muon_ns_coeffs as numbers (a, b, c)."""
    a, b, c = _numbers(t.muon_ns_coeffs)
    return a, b, c


def gpt2_lacks(m: Any) -> list[str]:
    """The settings of a model (a config's `model` or a ModelConfig) that transformers' GPT-2 cannot express:
    "model.key=value" for each switch away from GPT-2's value."""
    get = m.get if isinstance(m, ml_collections.ConfigDict) else lambda key: getattr(m, key)
    gpt2 = {key.removeprefix("model."): value for key, value in GPT2_SWITCHES.items()
            if key.startswith("model.") and key not in ("model.n_kv_heads", "model.zero_init_proj")}
    lacks = [f"model.{key}={get(key)!r}" for key, value in gpt2.items() if get(key) != value]
    if get("n_kv_heads") not in (0, get("n_heads")):
        lacks.append(f"model.n_kv_heads={get('n_kv_heads')!r}")
    return lacks


# One check per section of the config, run in this order; a new section adds its function here.
VALIDATORS: tuple[Callable[[ml_collections.ConfigDict], None], ...] = (
    _validate_model, _validate_mesh, _validate_distributed, _validate_data, _validate_train, _validate_sample,
    _validate_eval, _validate_run, _validate_serve, _validate_switches)


def validate(c: ml_collections.ConfigDict) -> None:
    """Check values that types alone do not catch; raise a ConfigError naming the key."""
    for check in VALIDATORS:
        check(c)


# OpenAI's GPT-2 sizes: (emb_dim, n_heads, n_layers); all have context 1024, qkv bias and a tied head.
GPT2_SIZES = {"124M": (768, 12, 12), "355M": (1024, 16, 24), "774M": (1280, 20, 36), "1558M": (1600, 25, 48)}


def gpt2_config(size: str) -> ml_collections.ConfigDict:
    """A config that samples from / evaluates / fine-tunes OpenAI's GPT-2 of this size.

    The architecture is read from the checkpoint's hparams.json when the weights load; the values set
    here document it and size the model before the weights arrive.
    """
    c = base_config()
    c.run_name = f"gpt2_{size.lower()}"
    c.pretrained = size
    m = c.model
    m.emb_dim, m.n_heads, m.n_layers = GPT2_SIZES[size]
    m.context_length, m.qkv_bias, m.tie_embeddings = 1024, True, True
    m.drop_rate = 0.0  # inference
    c.sample.prompt = ""  # empty: interactive chat; --config.sample.prompt="..." completes once
    c.sample.temperature, c.sample.top_k = 1.0, 40
    return c


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"drop_rate": 0.1}} -> {"model.drop_rate": 0.1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: dict, config: ml_collections.ConfigDict, within: tuple[str, ...] | None = None
                     ) -> list[str]:
    """"key: saved -> now" for each key of `config` whose value differs from the config a checkpoint saved; only
    the keys `within` names (a key or a group: "model.emb_dim", "train"), default all. A key the checkpoint lacks
    (added to the project since) is the same setting if it has its default, or whatever the backend resolved a
    default of "auto" to (`backends.resolve`); where compiled programs are cached is no setting of a run."""
    saved_flat, defaults = flatten(saved), flatten(base_config().to_dict())
    now = json.loads(json.dumps(flatten(config.to_dict())))  # as the checkpoint stored it (tuples as lists)
    return [f"{k}: {saved_flat.get(k)!r} -> {v!r}" for k, v in now.items()
            if (within is None or any(k == w or k.startswith(w + ".") for w in within))
            and not k.startswith("compilation_cache")
            and saved_flat.get(k) != v and not (k not in saved_flat and defaults.get(k) in (v, "auto"))]
