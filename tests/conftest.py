"""Shared fixtures: small LLaMA- and GPT-2-shaped models with trained-looking spectra."""

from __future__ import annotations

import os

# No network here, and none wanted from tests: every tool's telemetry off, hub offline.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_key] = _value

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def decaying_matrix(n_out: int, n_in: int, seed: int, low: float = -3.0) -> torch.Tensor:
    """A float64 matrix with log-spaced singular values 1 .. 10**low, like trained weights."""
    gen = torch.Generator().manual_seed(seed)
    k = min(n_out, n_in)
    U, _ = torch.linalg.qr(torch.randn(n_out, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_in, k, generator=gen, dtype=torch.float64))
    S = torch.logspace(0, low, k, dtype=torch.float64)
    return (U * S) @ V.T


@torch.no_grad()
def give_decaying_spectra(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Replace every linear/Conv1D weight by a decaying-spectrum matrix of the same shape."""
    for i, module in enumerate(m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))):
        rows, cols = module.weight.shape
        module.weight.copy_(scale * decaying_matrix(rows, cols, seed=1000 + i))
    return model


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
    )
    model = give_decaying_spectra(LlamaForCausalLM(config))
    return model.to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    return give_decaying_spectra(GPT2LMHeadModel(config)).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LLaMA saved in Hugging Face format, as a user's base model folder would be."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(path, safe_serialization=True)
    return str(path)
