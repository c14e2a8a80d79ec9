"""Fixtures of the unit tests."""

from __future__ import annotations

import errno
import os

import pytest


@pytest.fixture
def file_system_without_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """os.open refuses O_DIRECT with EINVAL, as tmpfs before Linux 6.6 and some network file systems do."""
    real_open = os.open

    def refusing_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing_direct)
