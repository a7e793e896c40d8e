"""The alerting part of terraform/ (python-hcl2): the alerts topic and who may publish to
it, the webhook URL as a secret mounted into sweep only, the settings the code reads,
and the optional alert policy on the structured log of a failed batch."""

from __future__ import annotations

import re

from orchestrator.alerts import DEFAULT_EVENTS
from orchestrator.pipeline.timing import ALERT_KINDS
from orchestrator.settings import Settings
from tests.test_terraform import block, expr, locals_, resources, strings, variables


def _sweep() -> dict:
    (body,) = [b for b in resources()["google_cloudfunctions2_function"].values()
               if expr(block(b, "build_config")["entry_point"]) == "local.entry_points.sweep"]
    return body


def test_the_alerts_topic_exists_and_only_sweep_publishes_to_it() -> None:
    topic = resources()["google_pubsub_topic"]["alerts"]
    assert expr(topic["name"]) == "var.alerts_topic"
    assert variables()["alerts_topic"]["default"] == Settings().alerts_topic
    grants = [g for g in resources()["google_pubsub_topic_iam_member"].values()
              if "google_pubsub_topic.alerts" in expr(g["topic"])]
    assert [(g["role"], g["member"]) for g in grants] == [
        ("roles/pubsub.publisher",
         'serviceAccount:${google_service_account.functions["sweep"].email}')]


def test_the_functions_are_told_the_topic_and_the_default_alert_events() -> None:
    env = locals_()["settings_environment"]
    assert expr(env["ORCHESTRATOR_ALERTS_TOPIC"]) == "google_pubsub_topic.alerts.name"
    assert expr(env["ORCHESTRATOR_ALERT_EVENTS"]).replace(" ", "") == (
        'join(",",var.alert_events)')
    # The deployment's default is the code's, and names only kinds the code knows.
    default = variables()["alert_events"]["default"]
    assert tuple(default) == DEFAULT_EVENTS
    assert set(default) <= set(ALERT_KINDS)
    validation = " ".join(strings(variables()["alert_events"]["validation"]))
    assert all(k in validation for k in ALERT_KINDS)


def test_the_webhook_url_is_a_secret_mounted_into_sweep_only() -> None:
    assert variables()["alert_webhook_secret"]["default"] is None
    (mount,) = block(_sweep(), "service_config")["dynamic"]
    content = block(mount["secret_environment_variables"], "content")
    assert content["key"] == "ORCHESTRATOR_ALERT_WEBHOOK_URL"
    assert expr(content["secret"]) == "secret_environment_variables.value"
    assert "var.alert_webhook_secret" in expr(mount["secret_environment_variables"]["for_each"])
    for name, body in resources()["google_cloudfunctions2_function"].items():
        if body is not _sweep():
            assert "ORCHESTRATOR_ALERT_WEBHOOK_URL" not in " ".join(strings(body)), name
    grant = resources()["google_secret_manager_secret_iam_member"]["alert_webhook"]
    assert grant["role"] == "roles/secretmanager.secretAccessor"
    assert 'functions["sweep"]' in grant["member"]
    assert "var.alert_webhook_secret" in expr(grant["secret_id"])
    assert "google_secret_manager_secret_iam_member.alert_webhook" in [
        expr(d) for d in _sweep()["depends_on"]]
    # Never a plain setting: the URL is the receiver's only credential.
    assert "ALERT_WEBHOOK" not in " ".join(locals_()["settings_environment"])


def test_the_failed_batch_policy_matches_the_log_line_the_code_writes() -> None:
    """The filter names `jsonPayload.event="batch_failed"`: the field that the dispatcher
    and the deadlines write on a failed batch's ERROR line (see test_alerts)."""
    policy = resources()["google_monitoring_alert_policy"]["batch_failed"]
    assert "var.batch_failed_alert_policy" in expr(policy["count"])
    condition = block(block(policy, "conditions"), "condition_matched_log")
    log_filter = expr(condition["filter"])
    assert 'jsonPayload.event=\\"batch_failed\\"' in log_filter
    assert 'resource.type=\\"cloud_run_revision\\"' in log_filter
    assert {k: expr(v) for k, v in condition["label_extractors"].items()} == {
        "pipeline": "EXTRACT(jsonPayload.pipeline)", "batch_id": "EXTRACT(jsonPayload.batch_id)"}
    # Cloud Monitoring requires a rate limit on a log-match condition.
    rate = block(block(policy, "alert_strategy"), "notification_rate_limit")
    assert re.fullmatch(r"\d+s", rate["period"])
    assert "var.alert_notification_channels" in expr(policy["notification_channels"])
