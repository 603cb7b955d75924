import os

# Tests run many small models on a 2-core box; one intra-op thread per process keeps the
# multi-process (gloo) tests from oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long benchmark-like test, excluded from the default run")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # Slow benchmark-like tests run only when asked for: `python -m pytest -m slow`.
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    run_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
