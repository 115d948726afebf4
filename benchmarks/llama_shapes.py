"""LLaMA-shaped models with trained-looking weight spectra, for the benchmarks.

Real checkpoints cannot be downloaded here, so the targets get synthetic weights whose
singular values fall log-spaced from 1 to 1e-3 (as trained weights decay). Each matrix is
``U[:, p] diag(S) V[:, q]^T`` with shared random orthonormal bases and per-matrix column
permutations and signs: every matrix differs (so the cache cannot cheat) and building 160
of them costs one matrix product each.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
QUARTER = {"hidden": 1024, "intermediate": 2752, "layers": 4}
LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32}


def _orthonormal(rows: int, cols: int, gen: torch.Generator, device: str) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen).to(device))
    return q


@torch.no_grad()
def build_model(
    hidden: int, intermediate: int, layers: int, *, device: str = "cpu", dtype=torch.float32, seed: int = 0
) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=32000 if hidden >= 4096 else 256,
        max_position_embeddings=4096,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    # to_empty leaves buffers as garbage memory: the rotary embedding's inv_freq is rebuilt
    # (it is a buffer, not a parameter, so the normal_ below would miss it; NaN losses otherwise).
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.normal_(0.0, 0.02)
    for module in model.modules():  # RMSNorm weights start at one
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.fill_(1.0)
    small = _orthonormal(hidden, hidden, gen, device)
    large = _orthonormal(intermediate, hidden, gen, device)
    spectrum = torch.logspace(0, -3, hidden, device=device)
    for name, module in model.named_modules():
        if not name.endswith(TARGETS):
            continue
        n_out, n_in = module.weight.shape
        left = small if n_out == hidden else large
        right = small if n_in == hidden else large
        p = torch.randperm(hidden, generator=gen).to(device)
        q = torch.randperm(hidden, generator=gen).to(device)
        signs = (torch.randint(0, 2, (hidden,), generator=gen) * 2 - 1).to(device, torch.float32)
        module.weight.copy_(((left[:, p] * (spectrum * signs)) @ right[:, q].T).to(dtype))
    return model.eval()
