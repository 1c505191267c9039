"""Shared fixtures. The embedded stack is real: started once per test run, always stopped."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests must not pick up a developer's own configuration.
for _name in [name for name in os.environ if name.startswith("STREAMVQA_")]:
    del os.environ[_name]

from hypothesis import settings as hypothesis_settings  # noqa: E402

from streamvqa import connect  # noqa: E402
from streamvqa.infra.local.stack import LocalStack  # noqa: E402
from streamvqa.settings import Settings  # noqa: E402

# CI runs the same examples every time (a red CI must be reproducible); developers'
# runs keep drawing new ones.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads for this run (and OMP_NUM_THREADS for the processes it starts); "
        "make test runs the numerics tests again with 1",
    )


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--torch-threads")
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_report_header(config: pytest.Config) -> str:
    import torch

    return f"torch {torch.__version__}: {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run every test outside the repository so ./streamvqa.toml is never read by accident."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a running embedded stack (memory:// broker) shared by the whole run."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("stack"), local={"broker_storage": "memory"})
    stack = LocalStack(settings)
    try:
        stack.up()
        yield settings
    finally:
        # Clients that Beam never tore down would log every reconnection attempt once
        # the broker is gone; that is expected at the end of the run, not news.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
        stack.down()


@pytest.fixture(scope="session")
def endpoints(stack_settings: Settings) -> connect.Endpoints:
    return connect.resolve_endpoints(stack_settings)


@pytest.fixture()
def private_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A stack of the test's own (for up/down/restart tests); stopped whatever happens."""
    stack = LocalStack(Settings(data_dir=tmp_path / "data", local={"broker_storage": "memory"}))
    try:
        yield stack
    finally:
        stack.down()
