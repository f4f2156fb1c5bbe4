"""The readers' error for a bad data file, checked to be the one printable line the CLI shows."""

from __future__ import annotations

import pytest

from embedtune.data import load_pairs
from embedtune.errors import DataError


def one_line_error(path) -> str:
    """`load_pairs(path)`'s DataError message, asserted to be one printable line."""
    with pytest.raises(DataError) as e:
        load_pairs(path)
    message = str(e.value)
    assert "\n" not in message and message.isprintable(), message
    return message
