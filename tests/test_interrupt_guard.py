"""InterruptGuard: the first Ctrl-C/SIGTERM asks for a checkpoint and a stop, the second aborts; a signal
the process was started ignoring (nohup, a script's background job) stays ignored during training too,
as Python leaves it ignored outside training."""

from __future__ import annotations

import os
import signal

import pytest

from embedtune.guards import InterruptGuard


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in InterruptGuard.SIGNALS}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_first_signal_requests_a_stop_second_aborts_and_handlers_come_back(restore_signals, capsys):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, whatever started pytest
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    before = {s: signal.getsignal(s) for s in InterruptGuard.SIGNALS}
    guard = InterruptGuard()
    with guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in InterruptGuard.SIGNALS} == before
    assert "SIGTERM: saving a checkpoint" in capsys.readouterr().err


def test_a_signal_started_ignored_stays_ignored(restore_signals):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    guard = InterruptGuard()
    with guard:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == guard._handle
        os.kill(os.getpid(), signal.SIGINT)  # ignored: no stop asked for
        assert not guard.requested
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
