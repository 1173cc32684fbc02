import os
# Tests never touch the hub, never fight over the 2 cores, and never draw progress bars.
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "DISTILL_NB_PROGRESS": "0"}.items():
    os.environ.setdefault(k, v)
