"""Which rank and which layers: a sweep on the demo world, with the spectral suggestion marked.

``python benchmarks/rank_sweep.py [--ranks 2 4 8 16 32] [--targets attention mlp both]
[--seed 1] [--out outputs/rank_sweep]``

Each (rank, target set) is one training run of the comparison harness (``tasks.compare``: the
demo profile's steps, rate, batch and replay share, the same validated data and scoring as
``make compare``), scored at its last step on the company held-out set (current truth) and
the two retention suites. One more run trains what ``milora inspect --suggest`` suggests for
the demo base (``milora.suggestion``: its rank, targets and per-layer ``rank_pattern``). The
verdict compares it with the measured best: the highest company score among runs whose
world-probe forgetting stays within ``--max-forgetting``. Writes ``<out>/sweep.csv``,
``sweep.md`` and ``sweep.png`` (company score against forgetting, the suggestion marked).
"""

from __future__ import annotations

import argparse
import csv
import json
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

logger = logging.getLogger("rank_sweep")
SUITES = ["company", "world_probes", "world_text"]
TARGET_SETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "both": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
COLUMNS = ["run", "rank", "targets", "company", "world_probes_forgetting", "world_text_forgetting"]


def suggested(settings) -> dict:
    from milora.modeling import load_base_model
    from milora.suggestion import suggest_for_model

    _, advice = suggest_for_model(load_base_model(settings.path(settings.base_model)))
    return {"rank": advice.rank, "targets": list(advice.target_modules), "rank_pattern": advice.rank_pattern}


def one_run(
    base, dataset: Path, out: Path, seed: int, name: str, rank: int, targets: list[str], pattern: dict
) -> dict:
    from tasks.compare import compare_run

    steps = base.train.hyperparameters().max_steps
    settings = base.with_overrides(
        {
            "compare.steps": steps,
            "compare.eval_every": steps,
            "compare.suites": SUITES,
            "compare.out_dir": str(out / name),
            "compare.rank": rank,
            "compare.replay_share": None,  # the profile's
            "compare.learning_rate": None,
            "train.target_modules": targets,
            "train.rank_pattern": pattern,
        }
    )
    started = time.perf_counter()
    record = compare_run(settings, "milora", seed, base.train.hyperparameters().learning_rate, dataset)
    last = record["points"][-1]
    logger.info("%s: %.0f s", name, time.perf_counter() - started)
    return {
        "run": name,
        "rank": rank,
        "targets": "+".join(t.removesuffix("_proj") for t in targets),
        "company": last["scores"]["company"],
        "world_probes_forgetting": last["forgetting"].get("world_probes", 0.0),
        "world_text_forgetting": last["forgetting"].get("world_text", 0.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument(
        "--targets", nargs="+", choices=sorted(TARGET_SETS), default=["attention", "mlp", "both"]
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-forgetting", type=float, default=0.05)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "rank_sweep"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from benchmarks.sweeps import validated_dataset

    base = load_settings(ROOT / "params.yaml")
    out = Path(args.out).resolve()
    dataset = validated_dataset(base, out)
    advice = suggested(base)
    logger.info("suggestion: %s", advice)
    rows = [
        one_run(base, dataset, out, args.seed, f"r{rank}-{kind}", rank, TARGET_SETS[kind], {})
        for kind in args.targets
        for rank in args.ranks
    ]
    rows.append(
        one_run(
            base,
            dataset,
            out,
            args.seed,
            "suggested",
            advice["rank"],
            advice["targets"],
            advice["rank_pattern"],
        )
    )
    print(write(rows, advice, out, args))
    return 0


def write(rows: list[dict], advice: dict, out: Path, args: argparse.Namespace) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    within = [r for r in rows[:-1] if r["world_probes_forgetting"] <= args.max_forgetting]  # the grid
    best = max(within, key=lambda r: r["company"]) if within else None
    mine = rows[-1]
    verdict = {
        "suggestion": advice,
        "best": best,
        "suggested_run": mine,
        "company_gap_to_best": None if best is None else round(best["company"] - mine["company"], 4),
    }
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
    lines = [
        f"milora, seed {args.seed}, the demo profile, on {platform.node()} ({os.cpu_count()} CPUs), "
        f"{time.strftime('%Y-%m-%d')}; best = highest company score with world-probe forgetting "
        f"<= {args.max_forgetting}",
        "",
        "| run | rank | targets | company | world probes forgetting | world text forgetting |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {'**' + r['run'] + '**' if r is best else r['run']} | {r['rank']} | {r['targets']} | "
        f"{r['company']:.3f} | {r['world_probes_forgetting']:.3f} | {r['world_text_forgetting']:.3f} |"
        for r in rows
    ]
    if best is not None:
        lines += [
            "",
            f"suggested run {mine['company']:.3f} against the best {best['company']:.3f} ({best['run']})",
        ]
    text = "\n".join(lines) + "\n"
    (out / "sweep.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.sweeps import save_frontier

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for kind in dict.fromkeys(r["targets"] for r in rows[:-1]):
        curve = [r for r in rows[:-1] if r["targets"] == kind]
        ax.plot([r["world_probes_forgetting"] for r in curve], [r["company"] for r in curve], marker="o",
                label=kind)  # fmt: skip
        for r in curve:
            ax.annotate(f"r{r['rank']}", (r["world_probes_forgetting"], r["company"]), fontsize=7)
    ax.scatter([mine["world_probes_forgetting"]], [mine["company"]], marker="*", s=160, color="black",
               label="suggested", zorder=3)  # fmt: skip
    ax.axvline(args.max_forgetting, color="grey", lw=0.8, ls="--")
    save_frontier(fig, ax, out / "sweep.png")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
