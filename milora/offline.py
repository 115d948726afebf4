"""The environment that keeps every tool of the stack from calling out.

Machines this pipeline runs on may have no network at all; none of Hugging Face, Prefect,
MLflow, DVC or GX may try to reach the internet (telemetry, update checks, hub lookups).
Tests, stage commands and the Makefile all set these.
"""

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",  # Prefect SDK and MLflow (MLflow honours the literal "true")
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}
