import numpy as np
import pytest

from mygpt_jax import data
from mygpt_jax.errors import UserError
from mygpt_jax.tokenizer import encode


def test_windows_are_shifted_targets_with_stride():
    ids = np.arange(20)
    starts = data.window_starts(len(ids), context_length=4, stride=3)
    w = data.gather(ids, starts, 4)
    # starts 0, 3, ..., 15 (a window needs context_length + 1 tokens: start < 20 - 4)
    assert w.shape == (6, 5) and w.dtype == np.int32
    np.testing.assert_array_equal(w[1], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(w[-1], [15, 16, 17, 18, 19])


def test_the_verdicts_epochs_are_the_seeds_shuffled_windows():
    text = data.load_text("")
    cut = int(0.9 * len(text))
    train = np.asarray(encode(text[:cut]), np.uint16)  # 4,612 tokens, as in the seed's 90/10 character split
    batches = data.EpochBatches(train, 256, 256, batch_size=2, seed=123)
    assert len(batches.starts) == 18 and batches.steps_per_epoch == 9 and batches.steps_until_epoch(10) == 90
    windows = data.gather(train, batches.starts, 256)
    np.testing.assert_array_equal(windows[0], encode(text[:cut])[:257])
    assert windows[1, 0] == windows[0, 256]  # stride = context: the target of one is the next's input
    for epoch in (0, 3):
        order = np.random.default_rng([123, epoch]).permutation(18)  # the seed's order of that epoch
        for i in range(9):
            np.testing.assert_array_equal(batches.batch(epoch * 9 + i), windows[order[2 * i:2 * i + 2]])
    assert batches.ends_epoch(8) and not batches.ends_epoch(9) and batches.position(9) == (1, 0)


def test_a_resume_with_another_batch_size_goes_on_after_the_windows_done():
    tokens = np.arange(14 * 8 + 1)
    before = data.EpochBatches(tokens, 8, 8, batch_size=4, seed=0)  # 14 windows: 3 batches an epoch
    assert before.position(1) == (0, 4)
    after = data.EpochBatches(tokens, 8, 8, batch_size=3, seed=0, anchor=(1, 0, 4))
    done = np.concatenate([before.batch(0), after.batch(1), after.batch(2), after.batch(3)])
    order = np.random.default_rng([0, 0]).permutation(14)
    np.testing.assert_array_equal(done[:, 0], 8 * order[:13])  # no window twice, none skipped
    assert after.position(4) == (1, 0) and after.steps_until_epoch(2) == 1 + 3 + 4


def test_random_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000) % 50257
    a, b = data.RandomBatches(tokens, 16, 8, seed=1), data.RandomBatches(tokens, 16, 8, seed=1)
    np.testing.assert_array_equal(a.batch(5), b.batch(5))  # another source, same (seed, step): the same windows
    assert not np.array_equal(a.batch(5), a.batch(6))
    assert not np.array_equal(a.batch(5), data.RandomBatches(tokens, 16, 8, seed=2).batch(5))
    batch = a.batch(7)
    assert batch.shape == (8, 17) and (np.diff(batch, axis=1) == 1).all()  # whole windows of the token array


def test_evaluation_windows_are_the_first_or_spread_over_the_split():
    np.testing.assert_array_equal(data.evaluation_windows(np.zeros(100), 10, 10, 3, spread=False), [0, 10, 20])
    np.testing.assert_array_equal(data.evaluation_windows(np.zeros(100), 10, 10, 3, spread=True), [0, 44, 89])


def test_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        data.load_text("/no/such/nope.txt")


def test_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(UserError, match="not UTF-8"):
        data.load_text(str(path))


def test_a_split_shorter_than_a_window_is_one_line():
    with pytest.raises(UserError, match="the validation split of x has 5 tokens, fewer than one window"):
        data.check_split("validation", 5, 256, "x")


def test_both_batch_sources_answer_the_loops_questions():
    from mygpt_jax import sharding
    from mygpt_jax.config import base_config

    tokens = np.arange(200, dtype=np.uint16)
    epochs = data.EpochBatches(tokens, 8, 8, batch_size=4, seed=0, num_epochs=2, max_steps=0)  # 24 windows
    random = data.RandomBatches(tokens, 8, batch_size=4, seed=0, max_steps=5)
    assert (epochs.total_steps, random.total_steps) == (12, 5)
    assert [epochs.ends_epoch(s) for s in range(12)] == [s == 5 or s == 11 for s in range(12)]
    assert not any(random.ends_epoch(s) for s in range(5)) and random.position(3) is None
    assert (epochs.epoch_of(6), tuple(epochs.position(7)), random.epoch_of(3)) == (2, (1, 4), None)
    assert "6 steps per epoch, 12 in all" in epochs.describe(50) and "5 steps" in random.describe(50)
    mesh = sharding.make_mesh(base_config().mesh)
    for source in (epochs, random):  # the batch on the mesh is the host's batch, as (micro-batches, rows, tokens)
        on_mesh = np.asarray(source.on_mesh(3, 2, sharding.batch_sharding(mesh)))
        np.testing.assert_array_equal(on_mesh, source.batch(3).reshape(2, 2, 9))
    capped = data.EpochBatches(tokens, 8, 8, batch_size=4, seed=0, num_epochs=2, max_steps=7)
    assert capped.total_steps == 7


def test_a_training_split_smaller_than_a_batch_is_one_line():
    with pytest.raises(UserError, match=r"fewer than one batch of --config\.train\.batch_size=8"):
        data.EpochBatches(np.arange(40), 8, 8, batch_size=8, seed=0)
