import os
# Tests never touch the hub, never fight over the 2 cores, and never draw progress bars.
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "DISTILL_NB_PROGRESS": "0"}.items():
    os.environ.setdefault(k, v)

import pytest

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-size or cold-start checks; run by `make slow` (DISTILL_NB_SLOW=1), skipped by `make test`")

def pytest_collection_modifyitems(config, items):
    if os.environ.get("DISTILL_NB_SLOW") == "1": return
    skip = pytest.mark.skip(reason="slow: run with `make slow` (DISTILL_NB_SLOW=1)")
    for it in items:
        if "slow" in it.keywords: it.add_marker(skip)
