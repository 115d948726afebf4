"""The demo profile's frontier: company score against forgetting for learning rates and replay shares.

``python benchmarks/profile_sweep.py [--lr 3e-3 6e-3] [--replay 0 0.25 0.5] [--steps 600]
[--eval-every 100] [--method milora] [--seed 1] [--out outputs/sweep]``

Each (rate, replay share) is one training run of the comparison harness (``tasks.compare``:
same data, init and scoring as ``make compare``), scored every ``--eval-every`` steps on the
company held-out set (current truth) and the two retention suites, so one run gives a whole
curve of steps. Prints one row per scored snapshot and writes ``<out>/frontier.csv``,
``frontier.md`` and ``frontier.png`` (company score against world-probe forgetting). The demo
profile in params.yaml is chosen from this table (README, "Choosing the demo profile").
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from milora.offline import OFFLINE_ENV  # noqa: E402

os.environ.update(OFFLINE_ENV)

from milora.settings import load_settings  # noqa: E402

logger = logging.getLogger("profile_sweep")
SUITES = ["company", "world_probes", "world_text"]
COLUMNS = [
    "learning_rate",
    "replay_share",
    "step",
    "company",
    "world_probes_forgetting",
    "world_text_forgetting",
]


def sweep(args: argparse.Namespace) -> list[dict[str, float]]:
    from benchmarks.sweeps import validated_dataset
    from tasks.compare import compare_run

    base = load_settings(ROOT / "params.yaml")
    out = Path(args.out).resolve()
    dataset = validated_dataset(base, out)
    rows = []
    for share in args.replay:
        for rate in args.lr:
            settings = base.with_overrides(
                {
                    "compare.steps": args.steps,
                    "compare.eval_every": args.eval_every,
                    "compare.suites": SUITES,
                    "compare.out_dir": str(out / f"replay-{share:g}"),
                    "compare.replay_share": share,
                }
            )
            started = time.perf_counter()
            record = compare_run(settings, args.method, args.seed, rate, dataset)
            logger.info("lr %g replay %g: %.0f s", rate, share, time.perf_counter() - started)
            for point in record["points"]:
                rows.append(
                    {
                        "learning_rate": rate,
                        "replay_share": share,
                        "step": point["step"],
                        "company": point["scores"]["company"],
                        "world_probes_forgetting": point["forgetting"].get("world_probes", 0.0),
                        "world_text_forgetting": point["forgetting"].get("world_text", 0.0),
                        "train_seconds": record["train_seconds"],
                    }
                )
    return rows


def write(rows: list[dict[str, float]], out: Path, args: argparse.Namespace) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "frontier.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, "train_seconds"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"{args.method}, seed {args.seed}, batch and schedule of the demo profile, on {platform.node()} "
        f"({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}",
        "",
        "| lr | replay | step | company | world probes forgetting | world text forgetting |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['learning_rate']:g} | {r['replay_share']:g} | {r['step']} | {r['company']:.3f} | "
        f"{r['world_probes_forgetting']:.3f} | {r['world_text_forgetting']:.3f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    (out / "frontier.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.sweeps import save_frontier

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for rate, share in dict.fromkeys((r["learning_rate"], r["replay_share"]) for r in rows):
        curve = [r for r in rows if (r["learning_rate"], r["replay_share"]) == (rate, share)]
        ax.plot([r["world_probes_forgetting"] for r in curve], [r["company"] for r in curve], marker="o",
                markersize=3, label=f"lr {rate:g}, replay {share:g}")  # fmt: skip
    ax.axhline(0.85, color="grey", lw=0.8, ls="--")
    ax.axvline(0.05, color="grey", lw=0.8, ls="--")
    save_frontier(fig, ax, out / "frontier.png")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3, 6e-3])
    parser.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--method", default="milora")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "sweep"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(write(sweep(args), Path(args.out), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
