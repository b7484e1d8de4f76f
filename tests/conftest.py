import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def no_progress_bars(tmp_path_factory):
    """Tests read stderr (one line per bad input), so progress bars are off for the whole suite:
    the README's bare `python -m pytest` then runs as CI does. `precision=auto`'s per-machine
    measurement is cached in a folder of the session's own (subprocesses inherit it), not the
    user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKE_NO_PROGRESS", "1")
        patch.setenv("RANKE_CACHE_DIR", str(tmp_path_factory.mktemp("ranke_cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Small ops run fastest on one thread; on a busy 2-core machine two threads per process
    oversubscribe the cores and a small training test runs ~20x slower (measured: 127 s vs 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
