"""Ingest + validate speed and memory: ``python benchmarks/validate.py``.

Generates synthetic company drops (10,000 records each by default: Alpaca and chat records
of 20-80 words, with a few duplicates, e-mail addresses and rows copied from the shared
benchmarks, so every check does real work), then runs ingest + the GX gate (publishing the
dataset) on 1, 4 and 10 drops, each in a fresh process so its peak RSS is its own. The
10-drop run is the 100,000-record figure (target <= 60 s on the 2-core CI machine); peak
memory should stay flat as drops are added, because each drop is read, checked and
written on its own. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Support-desk vocabulary for the synthetic records.
WORDS = " ".join(
    [
        "order ship refund warranty battery screen cable charger router lamp kettle speaker price return",
        "window store delivery invoice account password reset light button colour size stock update",
        "firmware manual guarantee replacement parcel courier address week month day customer support",
        "team product model code",
    ]
).split()


def make_drops(folder: Path, drops: int, rows: int, seed: int = 0) -> list[Path]:
    """Write ``drops`` JSONL files of ``rows`` records each; returns their paths."""
    rng = random.Random(seed)
    bench = REPO.parent / "shared" / "benchmarks" / "commonsense" / "boolq.json"
    copied = [item["instruction"] for item in json.loads(bench.read_text())[:200]] if bench.is_file() else []
    paths = []
    serial = 0
    for drop in range(drops):
        path = folder / f"drop_{2026 + drop // 12}_{drop % 12 + 1:02d}" / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        previous: list[str] = []
        with path.open("w", encoding="utf-8") as handle:
            for _ in range(rows):
                serial += 1
                roll = rng.random()
                if previous and roll < 0.02:  # an exact duplicate
                    handle.write(rng.choice(previous))
                    continue
                question = f"Question {serial}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 25))) + "?"
                answer = " ".join(rng.choices(WORDS, k=rng.randint(12, 55))) + "."
                if roll < 0.025:
                    answer += f" Contact agent{serial}@example.org."
                if roll > 0.998 and copied:
                    question = rng.choice(copied)
                if rng.random() < 0.3:
                    record = {
                        "messages": [
                            {
                                "role": "system",
                                "content": "You are the support assistant of the demo company.",
                            },
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                else:
                    record = {"instruction": question, "input": "", "output": answer}
                line = json.dumps(record) + "\n"
                previous.append(line)
                if len(previous) > 500:
                    previous.pop(0)
                handle.write(line)
        paths.append(path)
    return paths


def tokenizer_dir() -> Path:
    """The demo base model's tokenizer (committed; ``python -m milora.demo.build`` rebuilds it)."""
    demo = REPO / "data" / "demo" / "base_model"
    if not (demo / "tokenizer.json").is_file():
        raise SystemExit(f"{demo} has no tokenizer.json: run `python -m milora.demo.build` first")
    return demo


def child(data: Path, drops: int, work: Path, tokenizer: Path) -> dict[str, float]:
    """One measured run (in its own process): ingest + validate ``drops`` drops."""
    started = time.perf_counter()
    import yaml

    from milora.settings import load_settings
    from tasks.ingest import ingest
    from tasks.validate import validate

    imported = time.perf_counter()
    benchmarks = REPO.parent / "shared" / "benchmarks"
    params = {
        "base_model": str(tokenizer),
        "ingest": {
            "sources": [str(data / "drop_*/train.jsonl")],
            "watch": str(data),
            "out_dir": str(work / "ingested"),
        },
        "validate": {
            "dataset_dir": str(work / "dataset"),
            "reports_dir": str(work / "reports"),
            "gx_dir": str(REPO / "gx"),
            "max_tokens": 512,
            "min_rows": 100,
            "policies": {"unmatched_file": "warn"},  # runs read the first N drops of the folder
            "contamination": {
                "benchmarks": [str(benchmarks)] if benchmarks.is_dir() else [],
                "cache_dir": str(work.parent / "index-cache"),
            },
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    settings = load_settings(
        work / "params.yaml",
        {"ingest.sources": [str(p) for p in sorted(data.glob("drop_*/train.jsonl"))[:drops]]},
    )
    t0 = time.perf_counter()
    ingested = ingest(settings)
    t1 = time.perf_counter()
    report = validate(settings)
    t2 = time.perf_counter()
    return {
        "drops": drops,
        "records": ingested.rows,
        "published": report.rows,
        "quarantined": report.quarantined,
        "duplicates": ingested.duplicates,
        "import_s": round(imported - started, 2),
        "ingest_s": round(t1 - t0, 2),
        "validate_s": round(t2 - t1, 2),
        "seconds": round(t2 - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-drop", type=int, default=10_000)
    parser.add_argument("--drop-counts", default="1,4,10", help="comma-separated numbers of drops to run")
    parser.add_argument(
        "--child", nargs=4, metavar=("DATA", "DROPS", "WORK", "TOKENIZER"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1",
                       "MILORA_LOG_LEVEL": "WARNING"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("tasks").setLevel(logging.ERROR)  # quarantined rows are expected here
        data, drops, work, tokenizer = args.child
        print(json.dumps(child(Path(data), int(drops), Path(work), Path(tokenizer))))
        return
    counts = [int(c) for c in args.drop_counts.split(",")]
    with tempfile.TemporaryDirectory(prefix="milora-bench-validate-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        make_drops(root / "data", max(counts), args.rows_per_drop)
        print(
            f"generated {max(counts)} drops x {args.rows_per_drop} records in {time.perf_counter() - started:.1f} s"
        )
        tokenizer = tokenizer_dir()
        runs = []
        for drops in counts:
            work = root / f"run-{drops}"
            work.mkdir()
            command = [
                sys.executable,
                __file__,
                "--child",
                str(root / "data"),
                str(drops),
                str(work),
                str(tokenizer),
            ]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                raise SystemExit(f"run with {drops} drops failed")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["records_per_s"] = round(run["records"] / run["seconds"], 1)
            runs.append(run)
            print(
                f"{drops:3d} drops {run['records']:7d} records: {run['seconds']:6.1f} s "
                f"(ingest {run['ingest_s']:.1f} + validate {run['validate_s']:.1f}; imports {run['import_s']:.1f}), "
                f"{run['records_per_s']:8.0f} records/s, peak RSS {run['peak_rss_mb']:.0f} MB, "
                f"{run['quarantined']} quarantined, {run['duplicates']} duplicates"
            )
    last = runs[-1]
    print(
        json.dumps(
            {
                "benchmark": "ingest+validate",
                "records": last["records"],
                "drops": last["drops"],
                "seconds": last["seconds"],
                "records_per_s": last["records_per_s"],
                "target_s": 60,
                "within_target": last["seconds"] <= 60,
                "peak_rss_mb_by_drops": {str(r["drops"]): r["peak_rss_mb"] for r in runs},
                "rss_growth_first_to_last": round(last["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3),
                "seconds_by_drops": {str(r["drops"]): r["seconds"] for r in runs},
            }
        )
    )


if __name__ == "__main__":
    main()
