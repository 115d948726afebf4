"""Training: outputs, determinism, NaN stop, SIGKILL + resume, and two processes = one."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import company_conversations
from safetensors.torch import load_file

from milora import AdapterSpec, init_adapter
from milora.conversion import verify_adapter
from milora.modeling import load_base_model, load_tokenizer
from milora.training import NonFiniteLossError, TrainConfig, run_training, train_adapter
from milora.training.loop import last_complete_checkpoint

SMALL = {"batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "logging_steps": 1, "learning_rate": 2e-3}


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, rtol: float = 0.0, atol: float = 0.0) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in company_conversations(24)))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "milora.cli", "train", *map(str, args)]


def cli_options(**overrides) -> list[str]:
    options = {
        "rank": 4,
        "batch-size": 4,
        "micro-batch-size": 2,
        "warmup-steps": 1,
        "lr": 2e-3,
        "logging-steps": 1,
    }
    options.update(overrides)
    return [part for key, value in options.items() for part in (f"--{key}", str(value))]


def test_training_writes_adapter_metrics_curve_and_checkpoints(chat_model_dir, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(max_steps=4, save_steps=2, keep_checkpoints=True, **SMALL)
    result = run_training(chat_model_dir, company_conversations(24), run, AdapterSpec(r=4), config)
    assert result.global_step == 4 and result.examples == 24
    assert (run / "loss.csv").read_text().splitlines()[0] == "step,loss,learning_rate"
    assert (run / "adapter" / "initial" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter_for_stock_base" / "adapter_config.json").read_text())["r"] == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert len(losses) == 4 and all("learning_rate" in r and "grad_norm" in r for r in losses)
    assert any("train_tokens_per_second" in r for r in rows)
    assert (run / "loss_curve.png").stat().st_size > 1000
    for step in (2, 4):
        assert (
            run / "checkpoints" / f"checkpoint-{step}" / "initial" / "adapter_model.safetensors"
        ).is_file()
    trained, initial = (
        adapter_tensors(run),
        load_file(run / "adapter" / "initial" / "adapter_model.safetensors"),
    )
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # it learned something
    report = verify_adapter(lambda: load_base_model(chat_model_dir), run / "adapter")
    assert report["adapter vs converted plain LoRA on stock base"] <= 1e-4
    assert report["adapter vs merged model"] <= 1e-4
    # By default checkpoints go once the run succeeded (they exist to resume it).
    other = run_training(chat_model_dir, company_conversations(24), tmp_path / "lean", AdapterSpec(r=4),
                         TrainConfig(max_steps=2, save_steps=1, **SMALL))  # fmt: skip
    assert other.global_step == 2 and not (tmp_path / "lean" / "checkpoints").exists()


def test_same_seed_same_adapter(chat_model_dir, tmp_path):
    config = TrainConfig(max_steps=3, save_steps=10, **SMALL)
    for name in ("a", "b"):
        run_training(chat_model_dir, company_conversations(24), tmp_path / name, AdapterSpec(r=4), config)
    assert_same_adapter(tmp_path / "a", tmp_path / "b")


def test_non_finite_loss_stops_training_and_marks_nothing_final(chat_model_dir, tmp_path):
    model = init_adapter(load_base_model(chat_model_dir), method="milora", r=4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
    model.train()
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 1"):
        train_adapter(
            model,
            load_tokenizer(chat_model_dir),
            company_conversations(8),
            tmp_path / "run",
            TrainConfig(max_steps=2, save_steps=1, **SMALL),
        )
    assert not (tmp_path / "run" / "adapter").exists()


def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(chat_model_dir, data_file, tmp_path):
    options = cli_options(**{"max-steps": 60, "save-steps": 5})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(
        cli(chat_model_dir, data_file, tmp_path / "full", *options), env=env, capture_output=True
    )
    assert full.returncode == 0, full.stderr.decode()[-2000:]

    run = tmp_path / "killed"
    process = subprocess.Popen(
        cli(chat_model_dir, data_file, run, *options), env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while last_complete_checkpoint(run) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "adapter").exists(), "training finished before it could be killed"
    killed_at = last_complete_checkpoint(run)
    assert killed_at is not None

    resumed = subprocess.run(
        cli(chat_model_dir, data_file, run, *options), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert_same_adapter(run, tmp_path / "full", rtol=1e-6, atol=1e-7)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one(chat_model_dir, data_file, tmp_path):
    """torchrun with 2 CPU processes (gloo), same global batch: the same adapter (tolerance 1e-5)."""
    options = cli_options(**{"max-steps": 4, "save-steps": 100, "dropout": 0.0})
    one = subprocess.run(
        cli(chat_model_dir, data_file, tmp_path / "one", *options), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "milora.cli", "train",
        chat_model_dir, str(data_file), str(tmp_path / "two"), *options,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_adapter(tmp_path / "one", tmp_path / "two", rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- replay
def general_conversations(n: int) -> list[list[dict[str, str]]]:
    """General data unlike the company's (other words, other lengths)."""
    return [
        [
            {"role": "user", "content": f"Which lamp model {i} is a chair?"},
            {"role": "assistant", "content": f"The desk {i} radio."},
        ]
        for i in range(n)
    ]


def test_replay_sampler_puts_its_share_in_every_global_batch():
    from milora.training.loop import ReplayMixSampler

    lengths = [5 + i % 7 for i in range(30)] + [3 + i % 4 for i in range(50)]
    sampler = ReplayMixSampler(lengths, n_company=30, batch_size=8, replay_per_batch=2, seed=7)
    order = list(sampler)
    assert len(order) == len(sampler) == 5 * 8  # ceil(30 / 6) batches of 8
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert all(sum(i >= 30 for i in batch) == 2 for batch in batches)
    assert set(range(30)) <= set(order)  # one epoch passes over every company row
    assert all(lengths[a] >= lengths[b] for batch in batches for a, b in itertools.pairwise(batch))
    assert order == list(ReplayMixSampler(lengths, 30, 8, 2, seed=7))  # (seed, epoch) decide
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(ValueError, match="replay rows per batch"):
        ReplayMixSampler(lengths, 30, 8, 8, seed=7)


def test_replay_share_is_checked():
    with pytest.raises(ValueError, match=r"replay_share must be in \[0, 1\)"):
        TrainConfig(replay_share=1.0)
    with pytest.raises(ValueError, match="rounds to no replay row"):
        TrainConfig(batch_size=4, micro_batch_size=2, replay_share=0.1)
    assert TrainConfig(batch_size=16, micro_batch_size=4, replay_share=0.25).replay_rows_per_batch() == 4


def test_replay_rows_are_trained_at_the_configured_share(chat_model_dir, tmp_path, monkeypatch):
    """The real Trainer's batches: 2 of every 8 rows (two micro-batches of 4) are replay rows."""
    from milora.training import loop
    from milora.training.examples import encode

    tokenizer = load_tokenizer(chat_model_dir)
    replay = general_conversations(40)
    replay_ids = {tuple(e["input_ids"]) for e in encode(tokenizer, replay, 64).examples}
    seen: list[int] = []
    original = loop._Trainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), strict=True):
            seen.append(tuple(t for t, m in zip(ids, mask, strict=True) if m) in replay_ids)
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(loop._Trainer, "compute_loss", spy)
    config = TrainConfig(
        max_steps=3,
        save_steps=10,
        replay_share=0.25,
        max_length=64,
        **SMALL | {"batch_size": 8, "micro_batch_size": 4},
    )
    result = run_training(
        chat_model_dir, company_conversations(24), tmp_path / "run", AdapterSpec(r=4), config, replay=replay
    )
    assert result.replay_examples == 40 and result.replay_per_batch == 2
    assert len(seen) == 3 * 8
    assert [sum(seen[i : i + 8]) for i in range(0, 24, 8)] == [2, 2, 2]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["replay_examples"] == 40 and summary["config"]["replay_share"] == 0.25
    # Replay without a share is not trained on; a share without replay data is an error.
    with pytest.raises(ValueError, match="no replay data"):
        run_training(chat_model_dir, company_conversations(24), tmp_path / "none", AdapterSpec(r=4), config)
