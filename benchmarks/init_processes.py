"""Wall time of the streamed SVD init on 1 process against N processes sharing the matrices.

Why: under ``torchrun`` each process decomposes its share of the target matrices
(``milora.sharding``: longest first to the least loaded rank) and the factors are broadcast,
so N processes should approach an N-fold speed-up when there are enough matrices. This builds
the same random LLaMA-shaped checkpoint as ``init_memory.py``, then runs, alternating,
``--repeat`` times: ``torchrun --nproc_per_node 1`` and ``--nproc_per_node N`` of
``milora init --streamed``. The machine's cores are split evenly (``OMP_NUM_THREADS`` =
cores / processes), so both use the whole machine. It prints the median wall time of the
command and of the init itself (``init_seconds`` of the manifest, without interpreter start),
the speed-up, and checks that both wrote the same factors; the last line is one JSON object.

    python benchmarks/init_processes.py [--processes 2] [--layers 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_init(base: Path, out: Path, processes: int, threads: int) -> tuple[float, float]:
    """One ``milora init --streamed`` under torchrun; (wall seconds, the init's own seconds)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "milora.cli", "init",
        str(base), str(out), "--streamed", "--rank", "16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    return wall, float(json.loads((out / "milora.json").read_text())["init_seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/init_processes.py", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="milora-init-processes-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            [sys.executable, str(HERE / "init_memory.py"), "--build", str(base), "--hidden", str(args.hidden),
             "--intermediate", str(args.intermediate), "--layers", str(args.layers)],
            check=True,
        )  # fmt: skip
        runs: dict[int, list[tuple[float, float]]] = {1: [], args.processes: []}
        for i in range(args.repeat):
            for n in (1, args.processes) if i % 2 == 0 else (args.processes, 1):
                out = Path(tmp) / f"p{n}-{i}"
                runs[n].append(run_init(base, out, n, max(1, cores // n)))
        first = load_file(Path(tmp) / "p1-0" / "adapter_model.safetensors")
        shared = load_file(Path(tmp) / f"p{args.processes}-0" / "adapter_model.safetensors")
        # Thread counts differ (cores vs cores / N), so bits may too; the subspace may not.
        same = all(
            float((first[k] - shared[k]).abs().max()) <= 1e-4 * float(first[k].abs().max()) for k in first
        )
    n = args.processes
    result = {
        "cores": cores,
        "layers": args.layers,
        "matrices": 5 * args.layers,
        "processes": n,
        "wall_s_1": round(statistics.median(r[0] for r in runs[1]), 2),
        f"wall_s_{n}": round(statistics.median(r[0] for r in runs[n]), 2),
        "init_s_1": round(statistics.median(r[1] for r in runs[1]), 2),
        f"init_s_{n}": round(statistics.median(r[1] for r in runs[n]), 2),
        "same_factors": same,
    }
    result["init_speedup"] = round(result["init_s_1"] / result[f"init_s_{n}"], 2)
    result["wall_speedup"] = round(result["wall_s_1"] / result[f"wall_s_{n}"], 2)
    print(
        f"{result['matrices']} matrices on {cores} cores: init {result['init_s_1']} s on 1 process, "
        f"{result[f'init_s_{n}']} s on {n} (x{result['init_speedup']}); wall {result['wall_s_1']} s vs "
        f"{result[f'wall_s_{n}']} s (x{result['wall_speedup']}); same factors: {same}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
