"""Training: outputs, determinism, NaN stop, SIGKILL + resume, two processes = one, packing."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import company_conversations, free_port
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


def test_two_processes_train_like_one(chat_model_dir, data_file, tmp_path):
    """torchrun with 2 CPU processes (gloo), same global batch: the same adapter (tolerance 1e-5)."""
    options = cli_options(**{"max-steps": 4, "save-steps": 100, "dropout": 0.0})
    one = subprocess.run(
        cli(chat_model_dir, data_file, tmp_path / "one", *options), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "milora.cli", "train",
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
        # Packed: one row, its sequences bounded by cu_seq_lens (no attention mask, no padding).
        ids, bounds = inputs["input_ids"][0].tolist(), inputs["cu_seq_lens_q"].tolist()
        seen.extend(tuple(ids[a:b]) in replay_ids for a, b in itertools.pairwise(bounds))
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
    assert result.replay_examples == 40 and result.replay_per_batch == 2 and result.packed
    assert len(seen) == 3 * 8
    assert [sum(seen[i : i + 8]) for i in range(0, 24, 8)] == [2, 2, 2]
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["replay_examples"] == 40 and summary["config"]["replay_share"] == 0.25
    # Replay without a share is not trained on; a share without replay data is an error.
    with pytest.raises(ValueError, match="no replay data"):
        run_training(chat_model_dir, company_conversations(24), tmp_path / "none", AdapterSpec(r=4), config)


# --------------------------------------------------------------------------- packing
def response_only(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    """Examples of these lengths whose labels are -100 on a prompt (the first half)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 97, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return out


class _PadTokenizer:
    """What DataCollatorForSeq2Seq needs of a tokenizer to pad (right, with 0)."""

    pad_token_id, padding_side, model_input_names = 0, "right", ["input_ids", "attention_mask"]

    def pad(self, features, return_tensors="pt", **_):
        longest = max(len(f["input_ids"]) for f in features)
        return {
            key: torch.tensor([f[key] + [0] * (longest - len(f[key])) for f in features])
            for key in ("input_ids", "attention_mask")
        }


def test_a_packed_batch_has_the_padded_batch_loss_and_gradients():
    from conftest import tiny_gpt2, tiny_llama

    from milora.training.packing import (
        PackingCollator,
        packed_attention,
        packing_matches_padding,
        packing_unsupported,
        padding_collator,
        trained_logits_only,
    )

    features = response_only([7, 12, 5, 30, 9])
    model = init_adapter(tiny_llama(), method="milora", r=4)  # eval mode: no dropout
    assert packing_unsupported(model) is None and trained_logits_only(model)
    packed = PackingCollator()(features)
    # One row; positions restart for every sequence; each sequence's first label is -100.
    assert packed["input_ids"].shape == (1, 63) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for f in features for i in range(len(f["input_ids"]))]
    assert packed["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 54, 63] and packed["use_cache"] is False
    assert all(packed["labels"][0, start] == -100 for start in (0, 7, 19, 24, 54))
    padded = padding_collator(_PadTokenizer())(features)
    trained = int((padded["labels"][:, 1:] != -100).sum())
    assert packed["shift_labels"].shape == (1, trained) == (1, int(packed["logits_to_keep"].sum()))

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=trained).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    padded_loss, padded_grads = loss_and_grads(padded)
    with packed_attention(model):
        packed_loss, packed_grads = loss_and_grads(packed)
    assert model.config._attn_implementation == "sdpa"  # restored after training
    torch.testing.assert_close(packed_loss, padded_loss, rtol=0, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 0
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The check before training catches attention that crosses sequences.
    class Crossing(PackingCollator):  # positions that never restart, no sequence bounds
        def __call__(self, features, *args, **kwargs):
            batch = super().__call__(features, *args, **kwargs)
            del batch["cu_seq_lens_q"], batch["cu_seq_lens_k"]
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
            return batch

    assert packing_matches_padding(model, _PadTokenizer(), features, PackingCollator())
    with pytest.raises(ValueError, match="differs from the padded loss"):
        packing_matches_padding(model, _PadTokenizer(), features, Crossing())
    # Absolute position embeddings (GPT-2) read the restarted positions too.
    gpt2 = tiny_gpt2()
    assert packing_unsupported(gpt2) is None
    with torch.no_grad(), packed_attention(gpt2):
        gpt2_packed = gpt2(**PackingCollator(trained_logits_only(gpt2))(features)).loss
    torch.testing.assert_close(gpt2_packed, gpt2(**padded).loss, rtol=0, atol=1e-5)


def test_a_model_that_cannot_be_packed_trains_padded(chat_model_dir, tmp_path, caplog):
    """Eager attention (kept as the user chose it) is padded, grouped by length, and says so."""
    from milora.training.packing import packing_unsupported

    base = load_base_model(chat_model_dir)
    base.set_attn_implementation("eager")
    model = init_adapter(base, method="milora", r=4)
    assert "'eager', not 'sdpa'" in packing_unsupported(model)
    with caplog.at_level("WARNING", logger="milora.training.loop"):
        result = train_adapter(
            model,
            load_tokenizer(chat_model_dir),
            company_conversations(8),
            tmp_path / "run",
            TrainConfig(max_steps=1, save_steps=10, **SMALL),
        )
    assert not result.packed and result.global_step == 1
    assert "packing off: its attention is 'eager'" in caplog.text and "grouped by length" in caplog.text
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["packed"] is False


def test_packed_training_follows_the_padded_training(chat_model_dir, tmp_path):
    """Same order, no dropout: the Trainer's loss per token over accumulated micro-batches
    (num_items_in_batch) and the trained adapter are the padded run's, packed."""
    spec = AdapterSpec(r=4, lora_dropout=0.0)
    runs = {}
    for packing in (True, False):
        config = TrainConfig(max_steps=3, save_steps=10, packing=packing, **SMALL)
        run = tmp_path / str(packing)
        result = run_training(chat_model_dir, company_conversations(24), run, spec, config)
        assert result.packed is packing
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[packing] = [r["loss"] for r in rows if "loss" in r]
    assert len(runs[True]) == 3
    torch.testing.assert_close(runs[True], runs[False], rtol=0, atol=1e-5)
    assert_same_adapter(tmp_path / "True", tmp_path / "False", rtol=1e-4, atol=1e-6)
