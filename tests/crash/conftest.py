"""The crash harness's pytest plumbing: no global timeout for soak runs, and a summary at the end."""

from __future__ import annotations

import pytest

SUMMARIES = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak") or config.getoption("--crash-rounds"):
        for item in items:
            item.add_marker(pytest.mark.timeout(0))  # hundreds of rounds outlast the suite's timeout


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for line in config.stash.get(SUMMARIES, []):
        terminalreporter.write_line(line)
