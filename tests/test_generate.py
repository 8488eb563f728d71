import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mygpt_jax import backends
from mygpt_jax.errors import UserError
from mygpt_jax.generate import Generator, SamplingSettings, fit_prompt, sample_logits
from mygpt_jax.model import GPT, ModelConfig, init_params

CFG = ModelConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
BACKEND = backends.current()


def recompute_greedy(params, prompt, n):
    """Greedy decoding the slow way: the whole sequence through the model for every token."""
    ids = list(prompt)
    apply = jax.jit(GPT(CFG, BACKEND).apply)
    for _ in range(n):  # one fixed shape (causality makes the padding harmless): one compilation
        padded = np.zeros((1, CFG.context_length), np.int32)
        padded[0, :len(ids)] = ids
        logits, _ = apply({"params": params}, jnp.asarray(padded))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_length, new_tokens, cache_length", [(5, 30, 64), (16, 16, 32)])
def test_kv_cache_decoding_equals_full_recompute(prompt_length, new_tokens, cache_length):
    """The cache holds the padded prompt and the new tokens, rounded up to a power of two: the whole context,
    or a cache whose last position the last token fills."""
    params = init_params(dataclasses.replace(CFG, init_std=0.2), jax.random.key(0))
    prompt = [5, 17, 3, 88, 41, 60, 2, 9, 71, 33, 14, 96, 50, 8, 27, 64][:prompt_length]
    generator = Generator(CFG, params, SamplingSettings(max_new_tokens=new_tokens, stop_token=None), BACKEND)
    state, _ = generator._start(prompt, jax.random.key(0))
    assert state.cache[0].k.shape[2] == cache_length
    (cached,), notes = generator.generate(prompt, jax.random.key(0))
    assert notes == []
    expected = recompute_greedy(params, prompt, new_tokens)
    assert cached == expected
    assert len(set(expected)) > 3  # a non-degenerate sequence
    streamed = [int(t[0]) for t in generator.stream(prompt, jax.random.key(0))]
    assert streamed == expected


def test_stop_token_ends_generation():
    params = init_params(dataclasses.replace(CFG, init_std=0.2), jax.random.key(0))
    free = Generator(CFG, params, SamplingSettings(max_new_tokens=20, stop_token=None), BACKEND)
    (ids,), _ = free.generate([1, 2, 3], jax.random.key(0))
    stop = ids[4]
    stopping = Generator(CFG, params, SamplingSettings(max_new_tokens=20, stop_token=stop), BACKEND)
    (cut,), _ = stopping.generate([1, 2, 3], jax.random.key(0))
    assert cut == ids[:ids.index(stop)]


def test_sampling_is_reproducible_from_the_seed_and_batches():
    params = init_params(dataclasses.replace(CFG, init_std=0.2), jax.random.key(0))
    s = SamplingSettings(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=15, num_samples=3, stop_token=None)
    generator = Generator(CFG, params, s, BACKEND)
    a, _ = generator.generate([1, 2, 3], jax.random.key(7))
    b, _ = generator.generate([1, 2, 3], jax.random.key(7))
    c, _ = generator.generate([1, 2, 3], jax.random.key(8))
    assert a == b and a != c and len(a) == 3 and len({tuple(x) for x in a}) > 1


def test_top_k_and_top_p_restrict_the_candidates():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def drawn(settings):
        return set(np.asarray(jax.vmap(lambda k: sample_logits(logits, k, settings)[0])(keys)).tolist())

    assert drawn(SamplingSettings(temperature=1.0)) == {0, 1, 2, 3}
    assert drawn(SamplingSettings(temperature=1.0, top_k=2)) == {0, 1}
    assert drawn(SamplingSettings(temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert drawn(SamplingSettings(temperature=0.0)) == {0}


def test_a_prompt_is_kept_whole_and_the_new_tokens_capped_to_the_room_left():
    assert fit_prompt([1, 2], context_length=64, max_new_tokens=10) == ([1, 2], 10, [])
    ids, n, notes = fit_prompt([1, 2], context_length=64, max_new_tokens=500)
    assert ids == [1, 2] and n == 62 and len(notes) == 1 and "capped at 62" in notes[0]
    ids, n, notes = fit_prompt(list(range(60)), context_length=64, max_new_tokens=63)
    assert ids == list(range(60)) and n == 4 and len(notes) == 1
    ids, n, notes = fit_prompt(list(range(63)), context_length=64, max_new_tokens=63)
    assert ids == list(range(63)) and n == 1 and len(notes) == 1


def test_only_a_prompt_that_fills_the_context_keeps_its_last_tokens():
    ids, n, notes = fit_prompt(list(range(100)), context_length=64, max_new_tokens=10)
    assert ids == list(range(46, 100)) and n == 10 and len(notes) == 1 and "kept its last 54" in notes[0]
    ids, n, notes = fit_prompt(list(range(64)), context_length=64, max_new_tokens=500)
    assert ids == [63] and n == 63 and len(notes) == 1
    with pytest.raises(UserError):
        fit_prompt([], 64, 10)


def test_a_prompt_near_the_context_is_completed_whole():
    params = init_params(dataclasses.replace(CFG, init_std=0.2), jax.random.key(0))
    prompt = list(range(1, 61))
    generator = Generator(CFG, params, SamplingSettings(max_new_tokens=63, stop_token=None), BACKEND)
    (tokens,), notes = generator.generate(prompt, jax.random.key(0))
    assert tokens == recompute_greedy(params, prompt, 4) and len(notes) == 1


def test_bfloat16_decoding_streams_bfloat16_weights_and_gives_the_same_greedy_text():
    params = init_params(dataclasses.replace(CFG, init_std=0.2), jax.random.key(0))
    settings = SamplingSettings(max_new_tokens=30, stop_token=None)
    (f32,), _ = Generator(CFG, params, settings, BACKEND).generate([5, 17, 3, 88, 41], jax.random.key(0))
    bf16 = Generator(dataclasses.replace(CFG, dtype="bfloat16"), params, settings, BACKEND)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(bf16.params))
    (ids,), _ = bf16.generate([5, 17, 3, 88, 41], jax.random.key(0))
    assert ids == f32


def test_the_host_decoding_loop_makes_the_device_loops_tokens():
    """decode_loop="host" (one jitted step per token called from Python, Metal's) makes what the while_loop makes:
    greedy, sampled, and stopped early; and never compiles the while_loop."""
    params = init_params(dataclasses.replace(CFG, init_std=0.2), jax.random.key(0))
    greedy = SamplingSettings(max_new_tokens=20, stop_token=None)
    (free,), _ = Generator(CFG, params, greedy, BACKEND).generate([1, 2, 3], jax.random.key(0))
    for settings in (greedy, dataclasses.replace(greedy, stop_token=free[4]),
                     SamplingSettings(temperature=1.0, top_k=20, max_new_tokens=12, num_samples=2, stop_token=None)):
        on_device, on_host = (Generator(CFG, params, dataclasses.replace(settings, decode_loop=loop), BACKEND)
                              for loop in ("device", "host"))
        assert on_host.generate([1, 2, 3], jax.random.key(4)) == on_device.generate([1, 2, 3], jax.random.key(4))
        assert on_host._loop._cache_size() == 0 and on_device._loop._cache_size() == 1
    assert len(on_host.generate([1, 2, 3], jax.random.key(4))[0][0]) == 12


def test_sampling_never_picks_a_padding_row():
    cfg = dataclasses.replace(CFG, vocab_multiple=128)
    params = init_params(cfg, jax.random.key(3))
    # Make the padding rows' logits the largest: were they not masked, greedy and sampling would pick them.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 97:].set(10.0)  # rows 97..127 pad
    for temperature in (0.0, 1.0):
        generator = Generator(cfg, params, SamplingSettings(temperature=temperature, max_new_tokens=20,
                                                            num_samples=3, stop_token=None), BACKEND)
        samples, _ = generator.generate([1, 2, 3], jax.random.key(0))
        assert all(0 <= t < 97 for row in samples for t in row)
