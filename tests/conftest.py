"""Shared fixtures and helpers of the test modules (imported from here, never from each other).

- models: small LLaMA- and GPT-2-shaped models with trained-looking spectra, a chat model
- data: company records, JSONL files, a tokenizer and tiny benchmarks for ingest/validate
- projects: settings of a tiny stage project, a git + DVC sandbox project with this
  repository's pipeline code
- servers: free ports, health checks, stopping a server's process group
- numerics: logits, relative error, subspace angles, reference SVD parts
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from milora.offline import OFFLINE_ENV

# No network here, and none wanted from tests: every tool's telemetry off, hub offline.
os.environ.update(OFFLINE_ENV)

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from milora.settings import Settings, load_settings


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


# LLaVA-1.5-hf's chat template (its hub repository's): it iterates content parts (a plain-text
# turn renders as nothing), ends turns with a space and writes no BOS and no EOS.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_tokenizer(texts: list[str]):
    """A SentencePiece-style (Metaspace) BPE tokenizer that adds BOS, with ``<image>`` and
    LLaVA-1.5's template: the habits of LLaVA-1.5's LLaMA tokenizer, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    core.train_from_iterator([*texts, "USER: ASSISTANT: What colour"], trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    tokenizer.chat_template = LLAVA_15_TEMPLATE
    return tokenizer


IMAGE_SIDE, IMAGE_PATCH = 16, 4  # 16x16 images in 4x4 patches: 16 image tokens (CLS dropped)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def colour_image(path: Path, colour: str, side: int = IMAGE_SIDE, seed: int = 0) -> Path:
    """A PNG of one colour with a little noise (a synthetic product photo; ``seed``: another shot)."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng([seed, len(colour)]).integers(0, 20, (side, side, 3))
    pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def tiny_llava(vocab_size: int, image_token_index: int, **text: Any):
    """A LLaVA-shaped image-text-to-text model: a 2-layer CLIP tower on 16x16 images in 4x4
    patches (16 image tokens, CLS dropped) and a 2-layer LLaMA, random weights with
    trained-looking spectra."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIDE,
            patch_size=IMAGE_PATCH,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            **text,
        ),
        image_token_index=image_token_index,
        image_seq_length=(IMAGE_SIDE // IMAGE_PATCH) ** 2,
    )
    return give_decaying_spectra(LlavaForConditionalGeneration(config)).eval()


def save_tiny_llava(path: Path, texts: list[str]) -> Path:
    """A LLaVA-shaped image-text-to-text base (CLIP tower, 2-layer LLaMA, random weights with
    trained-looking spectra) with its processor and chat template, saved like a hub checkpoint."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = llava_tokenizer(texts)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = tiny_llava(
        len(tokenizer),
        image_id,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
        ),
        tokenizer=tokenizer,
        patch_size=IMAGE_PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_15_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


def colour_conversations(n: int = 8) -> list[list[dict[str, Any]]]:
    """Chat turns about product photos: the colour of the product in each (image path by colour)."""
    names = list(COLOURS)
    return [
        [
            {
                "role": "user",
                "content": "What colour is this product?",
                "images": [f"img/{names[i % 4]}.png"],
            },
            {"role": "assistant", "content": f"It is {names[i % 4]}."},
        ]
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny LLaVA with processor and chat template, its vocabulary from the chat test data."""
    texts = [m["content"] for c in company_conversations(64) + colour_conversations(8) for m in c]
    return str(save_tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava", texts))


# --------------------------------------------------------------------------- numerics
@torch.no_grad()
def pretend_training(model, seed: int, size: float = 0.05) -> None:
    """Move every LoRA factor as a few optimiser steps would."""
    from milora.initialize import lora_layers

    gen = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for factor in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            factor.add_(size * factor.abs().mean() * torch.randn(factor.shape, generator=gen))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def max_sine(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest principal-angle sine between span(basis) and span(reference) (columns)."""
    Q, _ = torch.linalg.qr(basis.double())
    Vr, _ = torch.linalg.qr(reference.double())
    return torch.linalg.svdvals(Q - Vr @ (Vr.T @ Q)).max().item()


def reference_part(W: torch.Tensor, r: int, side: str):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    part = slice(S.numel() - r, None) if side == "minor" else slice(0, r)
    return U[:, part], S[part], Vh[part].T


# --------------------------------------------------------------------------- data
REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "data" / "demo" / "base_model"


# --------------------------------------------------------------------------- helpers
def alpaca(i: int) -> dict[str, str]:
    """A distinct, clean Alpaca record."""
    return {
        "instruction": f"How do I reset the model {i} router?",
        "input": "",
        "output": f"Hold the reset button of router {i} for ten seconds, then wait for the light.",
    }


def chat(i: int, **changes: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You are the support assistant."},
        {"role": "user", "content": f"Where is order {i}?"},
        {"role": "assistant", "content": f"Order {i} ships tomorrow."},
    ]
    return {"messages": messages, **changes}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; a ``str`` row is written as the raw line, ``bytes`` as raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row + b"\n")
            elif isinstance(row, str):
                handle.write(row.encode() + b"\n")
            else:
                handle.write(json.dumps(row).encode() + b"\n")
    return path


@functools.cache
def tokenizer_dir() -> Path:
    """The demo model's tokenizer when built, else a small one made here with ``tokenizers``."""
    if (DEMO_TOKENIZER / "tokenizer.json").is_file():
        return DEMO_TOKENIZER
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([alpaca(i)["output"] for i in range(50)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endfor %}"
    out = Path(tempfile.mkdtemp(prefix="milora-test-tokenizer-"))
    tokenizer.save_pretrained(out)
    return out


GSM_ANSWER = (
    "Natalia sold 48 divided by 2 which is 24 clips in May and so altogether she sold 48 plus 24 "
    "which equals 72 clips in April and May together #### 72"
)
BOOLQ_TEMPLATE = (
    "Please answer the following question with true or false, question: {q}?\n\nAnswer format: true/false"
)


@functools.cache
def benchmark_dir() -> Path:
    """Two tiny benchmark files in the shapes of shared/benchmarks (commonsense JSON, GSM8K JSONL)."""
    out = Path(tempfile.mkdtemp(prefix="milora-test-bench-"))
    questions = [
        "is the sky blue on a clear day",
        "can penguins fly over the sea",
        "is water wet at room temperature",
    ]
    items = [
        {
            "instruction": BOOLQ_TEMPLATE.format(q=q),
            "input": "",
            "output": "the correct answer is true",
            "answer": "true",
        }
        for q in questions
    ]
    (out / "boolq.json").write_text(json.dumps(items), encoding="utf-8")
    write_jsonl(
        out / "gsm8k_test.jsonl",
        [
            {
                "question": "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
                "answer": GSM_ANSWER,
            }
        ],
    )
    return out


def make_settings(tmp_path: Path, overrides: dict[str, Any] | None = None, **validate: Any) -> Settings:
    """A params.yaml in ``tmp_path`` with small limits, the test tokenizer and benchmarks."""
    params = {
        "base_model": str(tokenizer_dir()),
        "ingest": {"sources": [], "out_dir": "ingested", "validation_fraction": 0.2},
        "validate": {
            "dataset_dir": "dataset",
            "reports_dir": "reports",
            "gx_dir": str(REPO / "gx"),
            "max_tokens": 256,
            "min_rows": 3,
            "max_duplicate_rate": 0.5,
            "contamination": {"benchmarks": [str(benchmark_dir())], "cache_dir": str(tmp_path / "cache")},
            **validate,
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return load_settings(path, overrides)


# --------------------------------------------------------------------------- projects
TINY_PROFILE = {
    "learning_rate": 5e-3,
    "max_steps": 4,
    "batch_size": 8,
    "micro_batch_size": 4,
    "warmup_steps": 0,
    "max_length": 64,
    "save_steps": 2,
    "logging_steps": 1,
}


def tiny_suites(tmp_path: Path) -> dict:
    heldout = [
        {"question": m[0]["content"], "answer": m[1]["content"]} for m in company_conversations(30)[24:]
    ]
    write_jsonl(tmp_path / "heldout.jsonl", heldout)
    (tmp_path / "world.txt").write_text(
        "The kettle model 3 costs 19 dollars.\nThe lamp model 9 costs 37 dollars.\n"
    )
    return {
        "company": {"kind": "qa", "path": "heldout.jsonl", "metric": "f1", "max_new_tokens": 8},
        "recall": {
            "kind": "qa",
            "path": "heldout.jsonl",
            "prompt": "Q: {question} A:",
            "metric": "starts_with",
            "max_new_tokens": 4,
            "retention": True,
        },
        "text": {"kind": "perplexity", "path": "world.txt", "retention": True},
        "absent": {"kind": "gsm8k", "path": "no/such/*.jsonl", "required": False},
    }


def stage_settings(root: Path, base_model: str, **overrides):
    """Settings for a tiny project in ``root``: one chat drop, the tiny profile, small suites."""
    write_jsonl(root / "drop.jsonl", [{"messages": m} for m in company_conversations(24)])
    return make_settings(
        root,
        {
            "base_model": base_model,
            "ingest.sources": ["drop.jsonl"],
            "validate.max_tokens": 120,
            "train.profile": "tiny",
            "train.profiles": {"tiny": TINY_PROFILE},
            "train.run_dir": "run",
            "evaluate.suites": tiny_suites(root),
            "evaluate.batch_size": 4,
            **overrides,
        },
    )


COPIED = [
    "dvc.yaml",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots_page.html",
    "tasks",
    "milora",
    "gx",
]


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def drop(root: Path, name: str, start: int, n: int) -> None:
    conversations = company_conversations(start + n)[start:]
    write_jsonl(root / "company" / name / "train.jsonl", [{"messages": m} for m in conversations])


def make_project(root: Path, base_model: str, copied: list[str] = COPIED) -> Path:
    """A git + DVC project with this repository's pipeline code and tiny data and settings."""
    for name in copied:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    drop(root, "drop_01", 0, 24)
    heldout = [
        {"question": m[0]["content"], "answer": m[1]["content"]} for m in company_conversations(40)[34:]
    ]
    write_jsonl(root / "eval" / "heldout.jsonl", heldout)
    params = {
        "base_model": base_model,
        "ingest": {"sources": ["company/drop_*/train.jsonl"], "watch": "company", "validation_fraction": 0.2},
        "validate": {
            "max_tokens": 120,
            "min_rows": 3,
            "contamination": {"benchmarks": ["eval"], "cache_dir": None},
        },
        "train": {"rank": 4, "profile": "tiny", "profiles": {"tiny": TINY_PROFILE}},
        "evaluate": {
            "batch_size": 4,
            "cache_dir": None,
            "suites": {
                "company": {"kind": "qa", "path": "eval/heldout.jsonl", "metric": "f1", "max_new_tokens": 8},
                "recall": {
                    "kind": "qa",
                    "path": "eval/heldout.jsonl",
                    "prompt": "Q: {question} A:",
                    "metric": "starts_with",
                    "max_new_tokens": 4,
                    "retention": True,
                },
            },
        },
        "registry": {"gate": {"max_forgetting": 1.0, "tolerance": 1.0}},
    }
    # Every key written out, defaults included: dvc.yaml interpolates them (${train.run_dir}).
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    full = load_settings(root / "params.yaml").model_dump(by_alias=True, mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    (root / ".gitignore").write_text("/outputs/\n/data/\n/mlflow.db\n/mlartifacts/\n/.cache/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "project")
    return root


# --------------------------------------------------------------------------- servers
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {seconds} s")


def stop(process: subprocess.Popen) -> None:
    """Stop a server and its children by process group id."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
