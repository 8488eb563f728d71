"""`preemption.StopSignals` in this process, with real signals: the first Ctrl-C or SIGTERM asks the loop to stop at
the next step boundary, a second one gives up at once, an error raised meanwhile leaves the block as it was raised,
and the handlers in place before the block are back after it however it ends. (Whole runs stopped by signals, one
process or two, are in test_train_cli.py and test_multiprocess.py.)"""

import os
import signal
import time

import pytest

from mygpt_jax.errors import UserError
from mygpt_jax.preemption import StopSignals


@pytest.fixture
def recorded() -> list[str]:
    """Handlers of this test's own for SIGINT and SIGTERM, recording the signals they get; the old ones after."""
    got: list[str] = []
    previous = {s: signal.signal(s, lambda n, _: got.append(signal.Signals(n).name)) for s in (signal.SIGINT,
                                                                                               signal.SIGTERM)}
    yield got
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_a_first_signal_only_asks_to_stop_at_the_next_step_boundary(recorded):
    with StopSignals() as stop:
        assert not stop.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        assert stop.should_stop(1)
    assert recorded == []  # StopSignals took it, not the handler it replaced


def test_an_error_raised_after_a_stop_request_leaves_the_block_unchanged_and_the_handlers_come_back(recorded):
    """A run that diverges after Ctrl-C ends with the divergence (nothing saved), not with a stop."""
    diverged = UserError("training diverged")
    with pytest.raises(UserError) as raised, StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        raise diverged
    assert raised.value is diverged
    os.kill(os.getpid(), signal.SIGTERM)  # after the block: the earlier handler gets it again
    assert recorded == ["SIGTERM"]
    assert stop.requested == "SIGINT"


def test_a_second_signal_gives_up_at_once(recorded):
    with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, long before the sleep ends
    os.kill(os.getpid(), signal.SIGINT)
    assert recorded == ["SIGINT"]  # handlers back after a KeyboardInterrupt too
