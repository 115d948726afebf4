"""benchmarks/year_simulation.py: a year of monthly retraining in a scratch copy of the project.

The table and plot writer is checked on made-up months (fast); the command itself runs two
real months (real flow runs, DVC stages, MLflow store) with a tiny training budget, and must
leave a table whose numbers come from those runs, and no scratch copy behind.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def load_year() -> ModuleType:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "year_simulation", REPO / "benchmarks" / "year_simulation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_table_and_plot_from_made_up_months(tmp_path):
    year = load_year()
    row = dict.fromkeys(year.COLUMNS)
    rows = [
        {
            **row,
            "month": "drop_a",
            "status": "promoted",
            "stages_run": "ingest, validate, init, train, evaluate",
            "train_s": 12.34,
            "company": 0.5,
            "stale_rate": None,  # one drop: no changed facts, no stale rate
            "forgetting": -0.01,
            "gate": year.short_gate({"decision": "promoted", "reasons": ["first model: no champion yet"]}),
            "version": "1",
            "flow_s": 60.0,
            "company_metric": "contains",
        },
        {
            **row,
            "month": "drop_b",
            "status": "rejected by the gate",
            "stages_run": "train, evaluate",
            "train_s": 3.0,
            "company": 0.25,
            "stale_rate": 0.1,
            "forgetting": 0.02,
            "gate": year.short_gate(
                {
                    "decision": "rejected",
                    "reasons": [
                        "company stale rate 0.1000 (of 10 changed facts) <= max 0.0500: FAILED",
                        "world_probes forgetting 0.0200 <= max 0.1000: ok",
                    ],
                }
            ),
            "version": "2",
            "flow_s": 50.0,
        },
        {**row, "month": "drop_c", "status": "failed", "stages_run": "none", "flow_s": 5.0, "error": "a | b"},
    ]
    table = year.write_outputs(rows, tmp_path, "header line")
    lines = table.splitlines()
    assert lines[0] == "header line" and lines[2].startswith("| month | status | stages run |")
    assert len([line for line in lines if line.startswith("| drop_")]) == 3
    assert "| 12.3 |" in lines[4] and "| 0.5000 |" in lines[4] and "| n/a |" in lines[4]
    assert "promoted: first model" in lines[4]
    assert "rejected: company stale rate 0.1000 (of 10 changed facts) <= max 0.0500 |" in lines[5]
    assert r"failed: a \| b" in lines[6]  # the error, its pipe escaped
    assert (tmp_path / "table.md").read_text() == table
    written = read_csv(tmp_path / "table.csv")
    assert [r["month"] for r in written] == ["drop_a", "drop_b", "drop_c"]
    assert list(written[0]) == list(year.COLUMNS)
    assert written[0]["stale_rate"] == "n/a" and written[2]["company"] == "n/a"
    assert float(written[1]["stale_rate"]) == 0.1
    assert (tmp_path / "year.png").read_bytes().startswith(PNG)


def test_gate_reason_in_a_few_words():
    year = load_year()
    paired = (
        "company vs champion v1 on the same items: -0.0128 [95% CI -0.0641, +0.0385], n=78 paired items; "
        "low end > min gain 0.0000 (better beyond noise): FAILED"
    )
    short = year.short_gate(
        {"decision": "rejected", "reasons": ["company stale rate 0.0 <= max 0.05: ok", paired]}
    )
    assert short == "rejected: company vs champion v1: -0.0128 [95% CI -0.0641, +0.0385], n=78 paired"
    twice = year.short_gate(
        {"decision": "rejected", "reasons": [paired, "world_probes forgetting 0.2 <= max 0.1: FAILED"]}
    )
    assert twice == short + " (+1 more failed)"
    passed = year.short_gate(
        {
            "decision": "promoted",
            "reasons": ["company stale rate 0.0 <= max 0.05: ok", paired.replace("FAILED", "ok"), "x: ok"],
        }
    )
    assert passed == "promoted: company vs champion v1: -0.0128 [95% CI -0.0641, +0.0385], n=78 paired"
    assert year.short_gate(None) is None


@pytest.mark.slow
def test_two_months_of_the_real_flow(tmp_path):
    out = tmp_path / "year"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "year_simulation.py"),
            "--out",
            str(out),
            "--months",
            "2",
            "--set",
            "train.profiles.demo.max_steps=20",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = read_csv(out / "table.csv")
    assert [r["month"] for r in rows] == ["drop_2026_10", "drop_2026_11"]
    first, second = rows
    assert first["stages_run"].split(", ") == ["ingest", "validate", "parent", "init", "train", "evaluate"]
    assert "train" in second["stages_run"].split(", ")  # a new drop: trained again (init is unchanged)
    assert second["status"] in ("promoted", "rejected by the gate"), second
    assert second["gate"].startswith(("promoted", "rejected")) and second["version"] == "2"
    for row in rows:
        assert 0.0 <= float(row["company"]) <= 1.0
        assert -1.0 <= float(row["forgetting"]) <= 1.0
        assert float(row["flow_s"]) > 0 and float(row["train_s"]) > 0
    assert 0.0 <= float(second["stale_rate"]) <= 1.0  # drop 2 changes facts of drop 1
    assert (out / "year.png").read_bytes().startswith(PNG)
    assert (
        "| drop_2026_11 |" in done.stdout
        and "settings overrides: `train.profiles.demo.max_steps=20`" in done.stdout
    )
    assert (out / "table.md").read_text() in done.stdout
    copied = re.search(r"copied \d+ files of \S+ to (\S+)", done.stderr)
    assert copied and not Path(copied.group(1)).exists()  # the scratch copy is gone without --keep
