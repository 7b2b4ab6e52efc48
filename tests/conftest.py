"""Test-wide settings."""
import torch

# One intra-op thread: on a 2-core machine shared with subprocess-launched harness runs,
# a second thread mostly stalls (a small training step went from ~3 ms to 1-3 s).
torch.set_num_threads(1)


# @pytest.mark.slow: tests over ~60 s (e.g. inductor compiling C++ on CPU).  Left out of the
# default run (`make test` stays lean); RUN_SLOW=1 runs them.
import os  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~60 s; skipped unless RUN_SLOW=1")


# The longest units first: make test spreads the suite over 2 xdist workers, and a long file
# (a group that stays on one worker) started last would leave the other worker idle at the end.
LONG_FIRST = ("test_combinations.py", "test_slurm_real.py", "test_readme.py", "test_bench.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept within
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test (or the harness it runs in-process) must leave SIGINT / SIGTERM as it found them:
    a leaked handler that only sets a flag would swallow later interrupts (the .beton writer's
    watchdog relies on one)."""
    import signal
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    leaked = {sig: handler for sig, handler in ((s, signal.getsignal(s)) for s in before) if handler is not before[sig]}
    for sig in leaked:
        signal.signal(sig, before[sig])
    if leaked:
        pytest.fail(f"signal handlers left installed: {leaked}")


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The bundled digits data as .beton files (digits_train.beton, digits_test.beton), written
    once per test session and shared by every test that asks for ``digits``."""
    from utils.data.writer import ensure_digits
    out = tmp_path_factory.mktemp("digits")
    ensure_digits(out)
    return out
