"""The promotion gate's rules on plain metrics: no registry, no model, milliseconds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from milora.promotion import FIRST_MODEL, by_suite, flatten, gate, paired_difference
from milora.records import Decision
from milora.settings import GateSettings

RULES = GateSettings(primary_suite="company", min_primary_gain=0.0, max_forgetting=0.1, tolerance=0.02)
CHAMPION = {
    "company.score": 0.5,
    "recall.score": 0.5,
    "recall.base_score": 0.5,
    "recall.forgetting": 0.0,
    "text.score": 20.0,
    "text.perplexity": 20.0,
    "text.forgetting": 0.0,
}


def test_the_first_model_passes():
    result = gate({"company.score": 0.1}, None, RULES)
    assert result.passed and result.reasons == [FIRST_MODEL] and result.decision == Decision.PROMOTED


def test_a_better_challenger_passes_with_every_condition_stated():
    result = gate({**CHAMPION, "company.score": 0.6, "recall.forgetting": 0.05}, CHAMPION, RULES)
    assert result.passed, result.reasons
    assert result.reasons == [
        "company score 0.6000 >= champion 0.5000 + min gain 0.0000 = 0.5000: ok",
        "recall forgetting since the stock base 0.0500 <= max 0.1000: ok",
        "text forgetting since the stock base 0.0000 <= max 0.1000: ok",
        "recall score 0.5000 >= champion 0.5000 - tolerance 0.0200 = 0.4800: ok",
        "text perplexity 20.0000 <= champion 20.0000 x (1 + tolerance 0.0200) = 20.4000 (lower is better): ok",
    ]


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        (
            {"company.score": 0.3},
            "company score 0.3000 >= champion 0.5000 + min gain 0.0000 = 0.5000: FAILED",
        ),
        (
            {"company.score": 0.6, "recall.forgetting": 0.25},
            "recall forgetting since the stock base 0.2500 <= max 0.1000: FAILED",
        ),
        (
            {"company.score": 0.6, "recall.score": 0.4},
            "recall score 0.4000 >= champion 0.5000 - tolerance 0.0200 = 0.4800: FAILED",
        ),
        (
            {"company.score": 0.6, "text.score": 20.5, "text.perplexity": 20.5},
            "text perplexity 20.5000 <= champion 20.0000 x (1 + tolerance 0.0200) = 20.4000 (lower is better): FAILED",
        ),
    ],
    ids=["company-drop", "forgetting", "other-suite-drop", "perplexity-rise"],
)
def test_each_condition_rejects_alone(changes, failed):
    result = gate({**CHAMPION, **changes}, CHAMPION, RULES)
    assert not result.passed and result.decision == Decision.REJECTED
    assert [r for r in result.reasons if r.endswith("FAILED")] == [failed]


def test_perplexity_falling_passes_and_rising_beyond_tolerance_fails():
    better = {**CHAMPION, "text.score": 12.0, "text.perplexity": 12.0}
    assert gate(better, CHAMPION, RULES).passed
    within = {**CHAMPION, "text.score": 20.39, "text.perplexity": 20.39}
    assert gate(within, CHAMPION, RULES).passed
    # Relative: 2% of a perplexity of 1.6751 (what the demo year's month 2 faced) is 0.0335.
    small = {**CHAMPION, "text.score": 1.6751, "text.perplexity": 1.6751}
    assert gate({**small, "text.score": 1.6958, "text.perplexity": 1.6958}, small, RULES).passed
    assert not gate({**small, "text.score": 1.71, "text.perplexity": 1.71}, small, RULES).passed


def test_a_primary_gain_can_be_required():
    rules = RULES.model_copy(update={"min_primary_gain": 0.05})
    assert not gate({**CHAMPION, "company.score": 0.54}, CHAMPION, rules).passed
    assert gate({**CHAMPION, "company.score": 0.55}, CHAMPION, rules).passed


def test_missing_scores_fail_or_are_noted():
    without_primary = {k: v for k, v in CHAMPION.items() if not k.startswith("company.")}
    result = gate(without_primary, CHAMPION, RULES)
    assert not result.passed
    assert "company (primary suite): not evaluated for the challenger: FAILED" in result.reasons
    # A suite only one side has is noted, never compared; the others still decide.
    result = gate(
        {**CHAMPION, "new.score": 0.2}, {k: v for k, v in CHAMPION.items() if k != "recall.score"}, RULES
    )
    assert result.passed
    assert "new: champion has no score; not compared" in result.reasons
    assert "recall: champion has no score; not compared" in result.reasons
    champion_only = {**CHAMPION, "gone.score": 0.9}
    assert (
        "gone: not evaluated for the challenger; not compared" in gate(CHAMPION, champion_only, RULES).reasons
    )


def test_flat_metrics_round_trip_with_dotted_suite_names_and_nan():
    nested = {
        "company": {"score": 0.5, "n": 80, "mode": "generate"},
        "world.v2": {"score": 0.9, "forgetting": 0.01},
    }
    flat = flatten(nested)
    assert flat == {
        "company.score": 0.5,
        "company.n": 80.0,
        "world.v2.score": 0.9,
        "world.v2.forgetting": 0.01,
    }
    assert by_suite(flat) == {
        "company": {"score": 0.5, "n": 80.0},
        "world.v2": {"score": 0.9, "forgetting": 0.01},
    }
    assert by_suite({"company.score": float("nan")}) == {}


def test_the_gate_loads_without_torch_or_mlflow():
    code = "import sys, milora.promotion, milora.settings; print(sorted(m for m in ('torch', 'mlflow', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------- paired, same items
def test_paired_difference_is_seeded_and_honest_about_noise():
    same = paired_difference([1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0])
    assert (same.mean, same.low, same.high, same.n) == (0.0, 0.0, 0.0, 4)
    better = paired_difference([1.0] * 40 + [0.0] * 10, [0.0] * 30 + [1.0] * 20)
    assert better == paired_difference([1.0] * 40 + [0.0] * 10, [0.0] * 30 + [1.0] * 20)  # seeded
    assert better.mean == pytest.approx(0.4) and 0.1 < better.low < 0.4 < better.high < 0.7
    one_item = paired_difference([1.0] + [0.0] * 89, [0.0] * 90)  # one question of 90: noise
    assert one_item.low == 0.0 and one_item.mean == pytest.approx(1 / 90)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0], [1.0, 0.0])


def paired(suite: str, new: list[float], old: list[float]) -> dict[str, float]:
    return {f"{suite}.{key}": value for key, value in paired_difference(new, old).metrics().items()}


def test_on_the_same_items_only_a_challenger_better_beyond_noise_is_promoted():
    equal = {**CHAMPION, **paired("company", [1.0] * 45 + [0.0] * 45, [1.0] * 45 + [0.0] * 45)}
    result = gate(equal, CHAMPION, RULES, rescored="3")
    assert not result.passed
    (reason,) = [r for r in result.reasons if r.startswith("company")]
    assert reason == (
        "company vs champion v3 on the same items: +0.0000 [95% CI +0.0000, +0.0000], n=90 paired items; "
        "low end > min gain 0.0000 (better beyond noise): FAILED"
    )
    noise = {**CHAMPION, **paired("company", [1.0] * 46 + [0.0] * 44, [1.0] * 45 + [0.0] * 45)}
    assert not gate(noise, CHAMPION, RULES, rescored="3").passed  # one question better: noise
    better = {**CHAMPION, **paired("company", [1.0] * 70 + [0.0] * 20, [1.0] * 45 + [0.0] * 45)}
    assert gate(better, CHAMPION, RULES, rescored="3").passed
    worse = {**CHAMPION, **paired("company", [1.0] * 30 + [0.0] * 60, [1.0] * 45 + [0.0] * 45)}
    assert not gate(worse, CHAMPION, RULES, rescored="3").passed
    # Measured against another champion than the one of now: the pairs are not used.
    fallback = gate({**equal, "company.score": 0.6}, CHAMPION, RULES, rescored=None)
    assert fallback.passed and fallback.reasons[0].startswith("company score 0.6000 >= champion 0.5000")


def test_other_suites_on_the_same_items_fail_only_when_worse_beyond_noise_and_tolerance():
    better = paired("company", [1.0] * 70 + [0.0] * 20, [1.0] * 45 + [0.0] * 45)
    slip = paired("recall", [1.0] * 44 + [0.0] * 46, [1.0] * 45 + [0.0] * 45)  # one item: noise
    assert gate({**CHAMPION, **better, **slip}, CHAMPION, RULES, rescored="3").passed
    drop = paired("recall", [1.0] * 20 + [0.0] * 70, [1.0] * 45 + [0.0] * 45)
    result = gate({**CHAMPION, **better, **drop}, CHAMPION, RULES, rescored="3")
    assert not result.passed
    assert any(
        r.startswith("recall vs champion v3 on the same items: -0.2778") and r.endswith("FAILED")
        for r in result.reasons
    )


def test_stored_scores_of_different_sizes_are_said_to_be_so():
    new = {"company.score": 0.6, "company.n": 90.0}
    old = {"company.score": 0.5, "company.n": 80.0}
    (reason,) = gate(new, old, RULES).reasons
    assert reason.endswith("(n=90 vs 80: stored scores of different items, not re-scored): ok")


def test_a_chain_that_drifts_a_little_each_month_is_stopped_by_its_cumulative_forgetting():
    """Each month from the champion loses 0.015 on the retention suite: within the tolerance
    against the champion every time, but forgetting is measured since the stock base, so the
    month whose total passes max_forgetting is rejected (and the champion stays)."""
    champion = {"company.score": 0.5, "recall.score": 0.9, "recall.base_score": 0.9, "recall.forgetting": 0.0}
    for month in range(1, 12):
        recall = 0.9 - 0.015 * month
        challenger = {
            "company.score": champion["company.score"] + 0.01,
            "recall.score": recall,
            "recall.base_score": 0.9,
            "recall.forgetting": 0.9 - recall,
        }
        result = gate(challenger, champion, RULES)
        within = [r for r in result.reasons if r.startswith("recall score")]
        assert within and within[0].endswith(": ok")  # never more than tolerance below the champion
        if not result.passed:
            break
        champion = challenger
    assert (
        month == 7 and "recall forgetting since the stock base 0.1050 <= max 0.1000: FAILED" in result.reasons
    )


def test_a_served_adapter_truncated_beyond_the_allowed_error_is_not_promoted():
    rules = RULES.model_copy(update={"max_compression_error": 0.05})
    better = {**CHAMPION, "company.score": 0.6}
    exact = gate({**better, "serving.rank": 32.0, "serving.compression_error": 0.0}, CHAMPION, rules)
    assert exact.passed and not any("truncated" in r for r in exact.reasons)
    close = gate({**better, "serving.rank": 64.0, "serving.compression_error": 0.01}, CHAMPION, rules)
    assert (
        close.passed
        and "served adapter truncated to rank 64: worst layer error 0.0100 <= max 0.0500: ok"
        in (close.reasons)
    )
    lossy = gate({**better, "serving.rank": 8.0, "serving.compression_error": 0.2}, None, rules)
    assert not lossy.passed  # even a first model
    assert (
        "served adapter truncated to rank 8: worst layer error 0.2000 <= max 0.0500: FAILED" in lossy.reasons
    )
    assert not any(r.startswith("serving") for r in close.reasons)  # not compared as a suite
