"""The PyTorch baselines that issue 5 measures mygpt_jax against, on the same machine.

PyTorch and transformers are not dependencies of mygpt_jax: run this in a separate environment,
    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers
    /tmp/torchenv/bin/python experiments/baselines/pytorch_gpt2.py            # a report
    /tmp/torchenv/bin/python experiments/baselines/pytorch_gpt2.py --json     # one JSON object
and compare with `python -m mygpt_jax.bench` run right before or after it.

It measures, in one process (float32, but for the one bfloat16 matmul rate):
matmul     torch.mm of two random square matrices, best of 5: 2048 x 2048 in float32, 512 x 512 in bfloat16
           (a CPU without AVX-512-BF16 computes a bfloat16 product far slower than a float32 one: docs/performance.md).
train      a plain eager PyTorch GPT (the seed model of configs/verdict.py: 768 wide, 12 layers, 12 heads,
           context 256, dropout 0.1, no qkv bias, untied head, GELU tanh, pre-LN) trained with AdamW
           (lr 4e-4, weight decay 0.1) on random tokens at batch 2: tokens/s over --steps steps after two
           warm-up steps. FLOPs as mygpt_jax.model.matmul_flops_per_token counts them.
decode     Hugging Face's GPT2LMHeadModel at the GPT-2 124M shape (random weights: none can be downloaded
           here, and speed does not depend on them), batch 1, greedy `generate` with its KV cache,
           --decode_tokens new tokens after "Every effort moves you" (its 4 GPT-2 token ids), once to warm
           up, then the best of --decode_runs.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn

PROMPT_IDS = [6109, 3626, 6100, 345]  # "Every effort moves you" in GPT-2's tokenizer


class Block(nn.Module):
    def __init__(self, d: int, heads: int, context: int, drop: float):
        super().__init__()
        self.heads, self.drop = heads, drop
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.dropout = nn.Dropout(drop)
        self.register_buffer("mask", torch.triu(torch.ones(context, context, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        weights = self.dropout(torch.softmax(scores.masked_fill(self.mask[:t, :t], float("-inf")), -1))
        x = x + self.dropout(self.proj((weights @ v).transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, vocab: int = 50257, d: int = 768, layers: int = 12, heads: int = 12, context: int = 256,
                 drop: float = 0.1):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.dropout = nn.Dropout(drop)
        self.blocks = nn.Sequential(*[Block(d, heads, context, drop) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln_f(self.blocks(self.dropout(self.wte(tokens) + self.wpe(positions)))))


def matmul_rate(n: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def matmul_flops_per_token(vocab: int, d: int, layers: int, context: int) -> int:
    """mygpt_jax.model.matmul_flops_per_token for an untied GPT without qkv bias: 6 per matmul weight
    (the head included, the embedding lookup free) + 12 L d T for attention."""
    matmul_weights = layers * (3 * d * d + d * d + 8 * d * d) + d * vocab
    return 6 * matmul_weights + 12 * layers * d * context


def bench_train(batch: int, context: int, steps: int) -> dict[str, float]:
    torch.manual_seed(123)
    model = GPT(context=context).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    tokens = torch.randint(0, 50257, (batch, context + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    tokens_per_s = batch * context / step_s
    return {"train_step_s": step_s, "train_tokens_per_s": tokens_per_s,
            "train_flops_per_s": tokens_per_s * matmul_flops_per_token(50257, 768, 12, context)}


def bench_hf_decode(new_tokens: int, runs: int) -> dict[str, float]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()  # 124M shape, context 1024, tied head
    prompt = torch.tensor([PROMPT_IDS])
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, **settings)  # warm-up
        run_s = float("inf")
        for _ in range(runs):  # the fastest counts, as in mygpt_jax.bench
            start = time.perf_counter()
            out = model.generate(prompt, **settings)
            run_s = min(run_s, time.perf_counter() - start)
    assert out.shape[1] == len(PROMPT_IDS) + new_tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - model.transformer.wpe.weight.nbytes
    return {"hf_decode_tokens_per_s": new_tokens / run_s, "hf_decode_bytes_per_token": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed train steps")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--decode_tokens", type=int, default=200)
    parser.add_argument("--decode_runs", type=int, default=3, help="timed decodings (the fastest counts)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.decode_tokens, args.decode_runs) < 1:
        parser.error("--steps, --batch_size, --decode_tokens and --decode_runs must be at least 1")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "matmul_flops_per_s_float32": matmul_rate(2048, torch.float32),
              "matmul_flops_per_s_bfloat16": matmul_rate(512, torch.bfloat16)}
    result.update(bench_train(args.batch_size, 256, args.steps))
    result.update(bench_hf_decode(args.decode_tokens, args.decode_runs))
    if args.json:
        print(json.dumps(result))
        return
    print(f"torch {result['torch']} ({result['cpu_capability']}, {result['threads']} threads): matmul "
          f"{result['matmul_flops_per_s_float32'] / 1e9:.1f} GFLOP/s float32, "
          f"{result['matmul_flops_per_s_bfloat16'] / 1e9:.1f} bfloat16")
    print(f"train step, seed model, batch {args.batch_size} x 256: {result['train_step_s']:.2f} s, "
          f"{result['train_tokens_per_s']:.1f} tokens/s, {result['train_flops_per_s'] / 1e9:.1f} GFLOP/s = "
          f"{result['train_flops_per_s'] / result['matmul_flops_per_s_float32']:.2f} of torch's matmul rate")
    print(f"Hugging Face GPT-2 124M decode (batch 1, {args.decode_tokens} tokens, KV cache): "
          f"{result['hf_decode_tokens_per_s']:.2f} tokens/s")


if __name__ == "__main__":
    main()
