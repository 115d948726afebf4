"""Names of what a training run folder holds, defined once for the library and the pipeline.

A run folder (``train.run_dir``) holds::

    init/                    the adapter at step 0 (initial factors included): resume starts here
    checkpoints/             Trainer checkpoints while training (removed after success)
    adapter/                 the trained MiLoRA adapter; it needs the residual base to load
    adapter_for_stock_base/  the same change as one plain LoRA for the unmodified base: served
    metrics.jsonl            per-step training metrics
    loss.csv                 step, loss, learning rate (what ``dvc plots`` draws)
    train_summary.json       written last: its presence marks the run finished
    run_key.json             the data, settings and base the folder was started with
"""

from __future__ import annotations

INITIAL_ADAPTER = "init"
CHECKPOINTS = "checkpoints"
RAW_ADAPTER = "adapter"
SERVED_ADAPTER = "adapter_for_stock_base"
METRICS = "metrics.jsonl"
LOSS_TABLE = "loss.csv"
LOSS_PLOT = "loss_curve.png"
SUMMARY = "train_summary.json"
RUN_KEY = "run_key.json"
