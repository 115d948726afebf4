"""The method comparison: aggregation and matched-score reading on known numbers, then the
real Prefect flow training lora, pissa and milora on a tiny model and scoring them along
training."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from conftest import stage_settings
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from flows.compare import compare_methods
from milora.comparison import Point, RunRecord, mean_std, plan_runs, summarise, value_at_level, write_report
from milora.comparison import trajectory as trajectory_module
from milora.comparison.aggregate import common_level
from milora.settings import SettingsError

SUITES = {
    "company": {"metric": "contains", "retention": False, "lower_is_better": False, "base": 0.0},
    "probes": {"metric": "starts_with", "retention": True, "lower_is_better": False, "base": 1.0},
}


def record(method: str, seed: int, company: list[float], probes: list[float], lr: float = 3e-3) -> RunRecord:
    """A run scored at steps 0, 10, 20, ... with the given company and probe scores."""
    points = [
        Point(10 * i, {"company": c, "probes": p}, {"probes": 1.0 - p})
        for i, (c, p) in enumerate(zip(company, probes, strict=True))
    ]
    return RunRecord(method, seed, lr, 4, 10 * (len(points) - 1), 0.5, 0, 10.0 + seed, 1.0, SUITES, points)


def test_value_at_level_reads_the_first_crossing():
    xs, ys = [0.0, 0.2, 0.6, 0.5, 0.9], [1.0, 0.9, 0.5, 0.4, 0.1]
    assert value_at_level(xs, ys, 0.4) == pytest.approx(0.7)  # halfway from (0.2, 0.9) to (0.6, 0.5)
    assert value_at_level(xs, ys, 0.55) == pytest.approx(0.55)  # the first crossing, not 0.6 -> 0.5
    assert value_at_level(xs, ys, 0.0) == 1.0
    assert value_at_level(xs, ys, 0.9) == pytest.approx(0.1)
    assert value_at_level(xs, ys, 0.95) is None


def test_mean_std_skips_missing_values():
    stat = mean_std([1.0, 2.0, 3.0, None, math.nan])
    assert (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    assert mean_std([None]).mean is None and mean_std([None]).show() == "n/a"
    assert mean_std([0.5]).std == 0.0


def test_summary_at_equal_steps_and_at_a_matched_company_score():
    runs = [
        record("fast", 1, [0.0, 0.6, 0.8], [1.0, 0.7, 0.6]),
        record("fast", 2, [0.0, 0.4, 0.9], [1.0, 0.8, 0.5]),
        record("slow", 1, [0.0, 0.2, 0.5], [1.0, 0.95, 0.9]),
        record("slow", 2, [0.0, 0.3, 0.7], [1.0, 0.9, 0.8]),
    ]
    assert common_level(runs, "company") == 0.5
    summary = summarise(runs, "company")
    assert summary.level == 0.5
    fast, slow = summary.rows["fast"], summary.rows["slow"]
    assert fast["company"].mean == pytest.approx(0.85) and fast["company"].std == pytest.approx(
        math.sqrt(0.005)
    )
    # At the last step the slow learner forgot less ...
    assert fast["probes forgetting"].mean == pytest.approx(0.45)
    assert slow["probes forgetting"].mean == pytest.approx(0.15)
    # ... at company = 0.5: fast s1 forgetting 0.25 (5/6 of the way to 0.3), s2 0.2 + 0.1/0.5 * 0.3 = 0.26;
    # slow s1 reaches 0.5 at its last step (0.1), s2 0.1 + 0.2/0.4 * 0.1 = 0.15.
    matched = "probes forgetting @ company=0.500"
    assert fast[matched].mean == pytest.approx((0.25 + 0.26) / 2)
    assert slow[matched].mean == pytest.approx((0.1 + 0.15) / 2)
    assert fast["train s"].mean == pytest.approx(11.5) and fast["SVD init s (cold)"].mean == 0.5
    assert fast["SVD init s (cached)"].n == 0  # every run here decomposed
    by_step = {(g, s, c): stat.mean for g, s, c, stat in summary.by_step}
    assert by_step[("slow", 10, "company")] == pytest.approx(0.25)
    assert by_step[("fast", 20, "probes forgetting")] == pytest.approx(0.45)
    # A level some run never reaches gives no value for it, not an extrapolation.
    high = summarise(runs, "company", level=0.8).rows["slow"]["probes forgetting @ company=0.800"]
    assert high.n == 0 and high.mean is None


def test_report_writes_the_main_table_the_sweep_and_the_plots(tmp_path):
    main = [
        record(m, s, [0.0, 0.3 + 0.1 * s, 0.9], [1.0, 0.9, 0.7])
        for m in ("lora", "milora")
        for s in (1, 2, 3)
    ]
    sweep = [main[0], main[3]] + [
        record(m, 1, [0.0, 0.5, 0.6], [1.0, 0.95, 0.9], lr=1e-3) for m in ("lora", "milora")
    ]
    result = write_report(main, sweep, tmp_path, header="# title\n")
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# title") and result["level"] == 0.9
    assert "| lora | 3 | 0.900 ± 0.000 | 0.300 ± 0.000 |" in table
    assert "| milora lr=0.001 | 1 | 0.600 | 0.100 |" in table
    assert "| lora lr=0.003 | 1 |" in table
    # The sweep's matched level is the main protocol's: the 1e-3 runs never reach 0.9.
    header_line = next(line for line in table.splitlines() if line.startswith("| method, rate"))
    header = [c.strip() for c in header_line.strip("|").split("|")]
    last = dict(zip(header, (c.strip() for c in table.splitlines()[-1].strip("|").split("|")), strict=True))
    assert last["method, rate"] == "milora lr=0.001"
    assert last["probes forgetting @ company=0.900"] == "n/a" and last["probes forgetting"] != "n/a"
    with (tmp_path / "sweep.csv").open() as handle:
        assert {r["group"] for r in csv.DictReader(handle)} == {
            "lora lr=0.003",
            "milora lr=0.003",
            "lora lr=0.001",
            "milora lr=0.001",
        }
    for path in result["plots"]:
        assert path.stat().st_size > 1000
    assert {p.name for p in result["plots"]} >= {
        "tradeoff.png",
        "tradeoff.svg",
        "sweep_tradeoff.svg",
        "steps.png",
    }


def test_other_suites_are_averaged_per_run_like_the_paper():
    suites = {
        **SUITES,
        "arc": {**SUITES["company"], "metric": "accuracy"},
        "boolq": {**SUITES["company"], "metric": "accuracy"},
    }
    runs = []
    for seed, (arc, boolq) in enumerate([(0.4, 0.6), (0.5, 0.9)], start=1):
        run = record("milora", seed, [0.0, 0.5], [1.0, 0.9])
        run.suites = suites
        run.points[-1].scores.update(arc=arc, boolq=boolq)
        runs.append(run)
    row = summarise(runs).rows["milora"]
    assert row["arc"].mean == pytest.approx(0.45) and row["boolq"].mean == pytest.approx(0.75)
    assert row["average of 2"].mean == pytest.approx(0.6)  # runs average 0.5 and 0.7
    assert row["average of 2"].std == pytest.approx(math.sqrt(0.02))


def test_plan_has_every_method_and_seed_then_the_sweep_without_repeats():
    runs = plan_runs(["lora", "milora"], [1, 2, 3], 3e-3, [1e-3, 3e-3], sweep_seeds=1)
    assert len(runs) == 8 and len(set(runs)) == 8
    assert {(r.method, r.seed) for r in runs[:6]} == {(m, s) for m in ("lora", "milora") for s in (1, 2, 3)}
    assert [(r.method, r.learning_rate, r.seed) for r in runs[6:]] == [("lora", 1e-3, 1), ("milora", 1e-3, 1)]
    assert runs[6].name == "lora-lr0.001-s1"


def test_bad_compare_settings_name_the_key(tmp_path, chat_model_dir):
    with pytest.raises(SettingsError, match=r"compare\.suites"):
        stage_settings(tmp_path, chat_model_dir, **{"compare.suites": ["nope"]})
    with pytest.raises(SettingsError, match=r"compare\.methods"):
        stage_settings(tmp_path, chat_model_dir, **{"compare.methods": ["milora", "dora"]})


def test_compare_flow_trains_scores_and_tabulates(tmp_path, chat_model_dir, monkeypatch):
    settings = stage_settings(
        tmp_path,
        chat_model_dir,
        **{
            "train.cache_dir": "svd-cache",
            "compare.seeds": [1, 2],
            "compare.steps": 4,
            "compare.eval_every": 2,
            "compare.suites": ["company", "recall", "text"],
            "compare.out_dir": "cmp",
        },
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(settings.model_dump(by_alias=True, mode="json")))
    with prefect_test_harness(server_startup_timeout=120):
        result = compare_methods(str(params))

        out = tmp_path / "cmp"
        records = {p.parent.name: RunRecord.read(p) for p in sorted((out / "runs").glob("*/trajectory.json"))}
        assert len(records) == 6  # 3 methods x 2 seeds
        for name, run in records.items():
            assert [p.step for p in run.points] == [0, 2, 4], name
            assert set(run.points[-1].forgetting) == {"recall", "text"}
            assert run.points[0].forgetting == {"recall": 0.0, "text": 0.0}  # step 0 is the base itself
            assert not (out / "runs" / name / "train" / "checkpoints").exists()  # scored, then removed
        assert records["lora-lr0.005-s1"].init_seconds == 0.0  # plain LoRA decomposes nothing
        # The second seed of an SVD method is served from the decomposition cache.
        assert (
            records["milora-lr0.005-s2"].init_cache_hits > 0
            and records["pissa-lr0.005-s2"].init_cache_hits > 0
        )
        # Different starts, same data and budget: the runs really differ.
        assert records["milora-lr0.005-s1"].points[-1].scores != records["pissa-lr0.005-s1"].points[-1].scores

        table = (out / "table.md").read_text()
        assert table == result["markdown"]
        main_rows = [
            line for line in table.splitlines() if line.startswith(("| lora |", "| pissa |", "| milora |"))
        ]
        assert len(main_rows) == 3 and all("| 2 |" in line for line in main_rows)
        assert "sweep" not in table  # none asked for
        assert "recall forgetting @ company=" in table
        with (out / "table.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        final = [r for r in rows if r["step"] == "" and r["column"] == "company"]
        assert sorted(r["group"] for r in final) == ["lora", "milora", "pissa"]
        assert {int(r["step"]) for r in rows if r["step"]} == {0, 2, 4}
        for name in ("tradeoff", "steps"):
            for suffix in ("png", "svg"):
                assert (out / f"{name}.{suffix}").stat().st_size > 1000, name

        # The flow run published the table as a Prefect markdown artifact.
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["method-comparison"]))
            )
        assert len(artifacts) == 1 and artifacts[0].type == "markdown"
        assert main_rows[0] in artifacts[0].data and "tradeoff.png" in artifacts[0].data

        # A rerun with unchanged inputs trains nothing: every run's record is reused.
        def no_training(*args, **kwargs):
            raise AssertionError("a recorded run was trained again")

        monkeypatch.setattr(trajectory_module, "run_training", no_training)
        again = compare_methods(str(params))
        assert again["markdown"].split("Main protocol")[1] == result["markdown"].split("Main protocol")[1]
        assert json.loads((out / "runs" / "milora-lr0.005-s1" / "trajectory.json").read_text())["key"]
