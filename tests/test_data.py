import numpy as np
import pytest

from mygpt_jax import data
from mygpt_jax.errors import UserError
from mygpt_jax.tokenizer import encode


def test_windows_are_shifted_targets_with_stride():
    ids = np.arange(20)
    w = data.make_windows(ids, context_length=4, stride=3)
    # starts 0, 3, ..., 15 (a window needs context_length + 1 tokens: start < 20 - 4)
    assert w.shape == (6, 5)
    np.testing.assert_array_equal(w[1], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(w[-1], [15, 16, 17, 18, 19])


def test_verdict_split_matches_the_seed():
    splits = data.load_splits("", 0.9, context_length=256)
    # 4,612 training and 534 validation tokens, as in the seed's 90/10 character split
    assert splits.train.shape == (18, 257) and splits.val.shape == (2, 257)
    text = data.load_text("")
    ids = encode(text[:int(0.9 * len(text))])
    np.testing.assert_array_equal(splits.train[0], ids[:257])
    assert splits.train[1, 0] == splits.train[0, 256]  # stride = context: the target of one is the next's input
    assert data.num_batches(18, 2, drop_last=True) == 9
    assert data.num_batches(3, 2, drop_last=False) == 2


def test_epoch_order_is_reproducible_and_differs_by_epoch():
    a, b = data.epoch_order(18, 123, 0), data.epoch_order(18, 123, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.epoch_order(18, 123, 1))
    assert sorted(a) == list(range(18))


def test_batches_resume_at_a_batch_index():
    windows = np.arange(10 * 3).reshape(10, 3)
    order = data.epoch_order(10, 0, 0)
    every = list(data.iterate_batches(windows, 3, order, drop_last=True))
    assert len(every) == 3
    later = list(data.iterate_batches(windows, 3, order, drop_last=True, start=1))
    np.testing.assert_array_equal(np.stack(every[1:]), np.stack(later))
    assert [len(b) for b in data.iterate_batches(windows, 3)] == [3, 3, 3, 1]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_splits(str(tmp_path / "nope.txt"), 0.9, 8)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(UserError, match="not UTF-8"):
        data.load_splits(str(path), 0.9, 8)


def test_file_too_short(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here.")
    with pytest.raises(UserError, match="fewer than one window"):
        data.load_splits(str(path), 0.9, 256)
