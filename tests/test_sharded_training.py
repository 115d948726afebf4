"""Sharded training engines (FSDP, DeepSpeed) launched by accelerate: where they can run.

On CPU, accelerate 1.15 enables neither engine: N launched processes would each train the
whole model alone (measured: N identical adapters, world size 1 in every process). The
training entry point refuses such a launch with an error naming the way that does work on
CPU (torchrun, DDP on gloo: ``tests/test_training.py``); on GPUs the GPU check runs FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, company_conversations, free_port

from milora.training.run import UnshardedLaunchError, check_sharded_launch


@pytest.mark.parametrize(
    ("environ", "cuda", "refused"),
    [
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, False, "FSDP"),
        ({"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true"}, False, "DeepSpeed"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, True, None),  # GPUs: the engine runs
        ({"WORLD_SIZE": "1", "ACCELERATE_USE_FSDP": "true"}, False, None),  # one process: nothing to shard
        ({"WORLD_SIZE": "2"}, False, None),  # torchrun: DDP on gloo
    ],
)
def test_a_sharded_launch_without_cuda_is_refused(environ, cuda, refused):
    if refused is None:
        check_sharded_launch(environ, cuda=cuda)
        return
    with pytest.raises(UnshardedLaunchError, match=rf"{refused} was launched on \d processes without CUDA"):
        check_sharded_launch(environ, cuda=cuda)


def test_accelerate_launch_with_the_fsdp_config_on_cpu_stops_before_training(chat_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in company_conversations(8)))
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        "-m", "milora.cli", "train", chat_model_dir, str(data), str(tmp_path / "run"), "--max-steps", "2",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert done.returncode != 0
    assert "FSDP was launched on 2 processes without CUDA" in done.stdout + done.stderr
    assert "torchrun --nproc_per_node N" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()  # nothing written
