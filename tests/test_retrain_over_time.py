"""benchmarks/retrain_over_time.py: retraining from the base against retraining from the champion.

The verdict (totals and the issue's targets) is checked on made-up rows; the command itself runs
two real months of the demo world for milora from the base and by refolding, with a tiny
budget, through the pipeline's stages and gate.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from types import ModuleType

from conftest import REPO


def load_script() -> ModuleType:
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "retrain_over_time", REPO / "benchmarks" / "retrain_over_time.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def row(method, strategy, month, train_s, company, forgetting, gate="promoted", served=None):
    return {
        "method": method,
        "strategy": strategy,
        "month": month,
        "train_s": train_s,
        "tokens": int(train_s * 100),
        "company": company,
        "served_company": company if served is None else served,
        "forgetting": forgetting,
        "stale_rate": 0.0,
        "gate": gate,
    }


def test_the_verdict_compares_each_chain_with_full_retraining_of_its_method():
    verdict = load_script().verdict(
        [
            row("milora", "full", "m1", 30.0, 0.90, 0.02),
            row("milora", "refold", "m1", 30.0, 0.90, 0.02),
            row("milora", "full", "m2", 30.0, 0.95, 0.04),
            row("milora", "refold", "m2", 5.0, 0.93, 0.03),
            row("milora", "continue", "m1", 30.0, 0.90, 0.02),
            row("milora", "continue", "m2", 10.0, 0.80, 0.05, gate="rejected: x", served=0.60),
        ]
    )
    refold, kept = verdict["targets"]["milora/refold"], verdict["targets"]["milora/continue"]
    assert refold == {
        "cost_ratio_s": round(35 / 60, 3),
        "cost_ratio_tokens": round(3500 / 6000, 3),
        "company_gap": 0.02,
        "served_company_gap": 0.02,
        "forgetting_vs_full": -0.01,
        "met": False,  # 0.58 of the cost is not a third
    }
    assert kept["served_company_gap"] == 0.35 and kept["forgetting_vs_full"] == 0.01
    assert verdict["arms"]["milora/continue"]["promoted"] == 1


def test_two_real_months_from_the_base_and_by_refolding(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "retrain_over_time.py"),
            "--out", str(out), "--months", "2", "--methods", "milora", "--strategies", "full", "refold",
            "--set", "train.profiles.demo.max_steps=6", "--set", "train.profiles.demo_month.max_steps=3",
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(verdict["arms"]) == {"milora/full", "milora/refold"} and "milora/refold" in verdict["targets"]
    with (out / "table.csv").open(newline="") as handle:
        rows = {(r["strategy"], r["month"]): r for r in csv.DictReader(handle)}
    first, full, refold = (
        rows["refold", "drop_2026_10"],
        rows["full", "drop_2026_11"],
        rows["refold", "drop_2026_11"],
    )
    assert first["train_s"] == rows["full", "drop_2026_10"]["train_s"]  # month 1 of the chain: the full run
    # Month 2 from the champion trains on the new rows and half the earlier ones, fewer steps.
    assert int(refold["rows_new"]) > 0 and int(refold["rows"]) < int(full["rows"])
    assert int(refold["tokens"]) < int(full["tokens"])
    assert int(refold["served_rank"]) == 64 and int(full["served_rank"]) == 32  # the chain's rank adds up
    assert (out / "months.png").read_bytes().startswith(b"\x89PNG") and (out / "table.md").is_file()
