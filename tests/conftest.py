"""Shared fixtures: small LLaMA- and GPT-2-shaped models with trained-looking spectra."""

from __future__ import annotations

import os

from milora.offline import OFFLINE_ENV

# No network here, and none wanted from tests: every tool's telemetry off, hub offline.
os.environ.update(OFFLINE_ENV)

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D


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


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config: int | None) -> LlamaForCausalLM:
    """Two LLaMA layers (hidden 64) with decaying spectra; ``config`` overrides LlamaConfig."""
    torch.manual_seed(seed)
    shape = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 97,
        "max_position_embeddings": 64,
    }
    model = give_decaying_spectra(LlamaForCausalLM(LlamaConfig(**{**shape, **config})))
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


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def company_conversations(n: int = 24) -> list[list[dict[str, str]]]:
    """Small instruction data in chat form: product prices of a fictional shop."""
    items = ["kettle", "lamp", "chair", "desk", "mug", "fan", "clock", "radio"]
    return [
        [
            {"role": "user", "content": f"How much is the {items[i % 8]} model {i}?"},
            {"role": "assistant", "content": f"The {items[i % 8]} model {i} costs {10 + 3 * i} dollars."},
        ]
        for i in range(n)
    ]


def build_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer with a chat template, trained offline on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LLaMA with a trained tokenizer and chat template, saved like a real base."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat-llama"
    texts = [m["content"] for c in company_conversations(64) for m in c] + [CHAT_TEMPLATE]
    tokenizer = build_tokenizer(texts)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)
