"""The harness's reports survive JSON field for field, and a report that does not match its
record fails at reading with the field's name (not with a KeyError deep in a test)."""

from __future__ import annotations

import json

import pytest

from harness.fault_report import CampaignReport, EngineSeen, ManyFailures, ProcStats
from harness.reports import PlanFacts, ScenarioReport, StepReport, read, write
from refit.spec import EngineStatus


def _step(step: int) -> StepReport:
    return StepReport(
        step=step, p2p_seconds=0.5, golden_seconds=1, delta=False, wire_bytes=10,
        baseline_bytes=0, peak_staging_bytes=4, engine_staging_bytes=4, engine_extra_bytes=8,
        trainer_extra_bytes=2, bulk_bytes=9, misc_bytes=1, trainer_sent_bytes=10,
        relayed_bytes=0, phases={"transfer": 0.25}, received_differs=[[], ["x"]],
        state_differs=[[], []], captured_tensors=3, tokens_equal=[[True, False]],
        max_logprob_diff=1e-6, hf_changed=True,
    )  # fmt: skip


def test_a_scenario_report_round_trips(tmp_path):
    facts = PlanFacts(1, 2, 1, 2, 5, 1, 64)
    report = ScenarioReport(
        args={"model": "qwen3"}, plan="p", plan_facts=facts, bulk_fraction=0.9,
        misc=[("lm_head.weight", "padded")], prepare_seconds=0.1,
        initial_tokens_equal=[[True]], steps=[_step(1), _step(2)], ok=False,
    )  # fmt: skip
    write(report, tmp_path / "r.json")
    back = read(ScenarioReport, tmp_path / "r.json")
    assert back == report
    assert isinstance(back.steps[1], StepReport) and back.steps[1].golden_seconds == 1.0
    assert back.misc == [("lm_head.weight", "padded")]  # tuples again
    assert not back.steps[0].ok(1e-4)  # a differing tensor and a differing token


def test_a_campaign_report_round_trips(tmp_path):
    stats = {"engine": ProcStats(threads=70, fds=110, rss=1 << 30, pid=7)}
    report = CampaignReport(
        many_failures=ManyFailures(
            case="200 failing refits in a row", passed=True, recovered=True, failed=200,
            seconds_per_failure=0.06, before=stats, after=stats, grown=[],
        )
    )  # fmt: skip
    write(report, tmp_path / "c.json")
    back = read(CampaignReport, tmp_path / "c.json")
    assert back == report and back.extras() == [report.many_failures] and back.ok
    assert isinstance(back.many_failures.before["engine"], ProcStats)


def test_a_report_that_does_not_match_its_record_is_refused_by_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"status": None, "generate_refused": "yes"}))
    with pytest.raises(TypeError, match="expected bool"):
        read(EngineSeen, path)
    path.write_text(json.dumps({"status": None, "holds_weights": 3}))
    with pytest.raises(TypeError, match=r"EngineSeen: unknown fields \['holds_weights'\]"):
        read(EngineSeen, path)
    path.write_text(json.dumps({"generate_refused": True}))
    with pytest.raises(TypeError, match=r"EngineSeen: .*status"):
        read(EngineSeen, path)
    path.write_text(json.dumps({"status": {"version": 2, "attempted": 3, "holds": None}}))
    seen = read(EngineSeen, path)  # the product's own status record, nested
    assert isinstance(seen.status, EngineStatus) and seen.alive and seen.stale
    assert not seen.rolled_back
