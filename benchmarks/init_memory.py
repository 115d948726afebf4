"""Peak resident memory of SVD init: streamed from the shards vs the whole model loaded.

Why: a base larger than RAM (or than one GPU) can only be initialised if init never holds the
model. This builds a LLaMA-shaped checkpoint with random weights (sharded safetensors), then
runs, each in a fresh process, alternating, ``--repeat`` times: the in-memory init
(``load_base_model`` + ``init_adapter`` + ``save_adapter``, the baseline) and the streamed one
(``milora.streaming.init_streamed``). It prints the model's size, the largest target matrix,
the median peak RSS of each (``ru_maxrss`` of the child, from ``wait4``), the floor (a
process that only imports torch, transformers, PEFT and milora) and the ratio; the last line
is one JSON object.

    python benchmarks/init_memory.py [--hidden 1024] [--intermediate 2752] [--layers 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)

CHILD = """
import sys, time
from milora import AdapterSpec
spec = AdapterSpec("milora", 16)
base, out, how = sys.argv[1:4]
started = time.perf_counter()
if how == "imports":  # the floor: the interpreter with torch, transformers and PEFT loaded
    import milora.streaming, milora.initialize, milora.modeling
elif how == "streamed":
    from milora.streaming import init_streamed
    init_streamed(base, spec, out, progress=False)
else:
    from milora import init_adapter, save_adapter
    from milora.modeling import load_base_model
    save_adapter(init_adapter(load_base_model(base), spec, progress=False), out)
print(time.perf_counter() - started)
"""


def build(path: Path, hidden: int, intermediate: int, layers: int) -> None:
    """A random LLaMA-shaped float32 checkpoint in ~64 MB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="64MB")


def run_child(base: Path, out: Path, how: str) -> tuple[int, float]:
    """One init in a fresh process; (its own peak RSS in bytes, seconds)."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(base), str(out), how], stdout=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read() if process.stdout else ""
    if status != 0:
        raise RuntimeError(f"{how} init failed (status {status})")
    return usage.ru_maxrss * 1024, float(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/init_memory.py", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child that writes the checkpoint
    args = parser.parse_args(argv)
    if args.build:
        build(args.build, args.hidden, args.intermediate, args.layers)
        return 0
    with tempfile.TemporaryDirectory(prefix="milora-init-memory-") as tmp:
        base = Path(tmp) / "base"
        # Built in a child: a child's peak RSS counts what it inherited at fork, so this
        # process must never hold the model.
        subprocess.run(
            [sys.executable, __file__, "--build", str(base), "--hidden", str(args.hidden),
             "--intermediate", str(args.intermediate), "--layers", str(args.layers)],
            check=True,
        )  # fmt: skip
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        largest = args.hidden * args.intermediate * 4
        runs: dict[str, list[tuple[int, float]]] = {"in_memory": [], "streamed": [], "imports": []}
        for i in range(args.repeat):
            order = (
                ("in_memory", "streamed", "imports") if i % 2 == 0 else ("streamed", "in_memory", "imports")
            )
            for how in order:
                runs[how].append(run_child(base, Path(tmp) / f"{how}-{i}", how))
    result = {
        "checkpoint_mb": round(size / 2**20, 1),
        "largest_target_mb": round(largest / 2**20, 1),
        **{
            f"{how}_peak_mb": round(statistics.median(r[0] for r in found) / 2**20, 1)
            for how, found in runs.items()
        },
        **{f"{how}_s": round(statistics.median(r[1] for r in found), 2) for how, found in runs.items()},
    }
    result["peak_ratio_streamed_vs_in_memory"] = round(
        result["streamed_peak_mb"] / result["in_memory_peak_mb"], 3
    )
    print(
        f"checkpoint {result['checkpoint_mb']} MB (largest target matrix {result['largest_target_mb']} MB): "
        f"peak RSS in memory {result['in_memory_peak_mb']} MB, streamed {result['streamed_peak_mb']} MB "
        f"(x{result['peak_ratio_streamed_vs_in_memory']}; imports alone {result['imports_peak_mb']} MB); "
        f"{result['in_memory_s']} s vs {result['streamed_s']} s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
