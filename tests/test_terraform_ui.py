"""Static checks of the optional web UI in terraform/ui.tf: off by default, opened only
by named invokers, its own identity with the narrowest grants, and the same package
image and settings as the rest of the deployment."""

from __future__ import annotations

from tests.test_terraform import (
    PUBLIC_MEMBERS,
    TERRAFORM,
    block,
    expr,
    locals_,
    parsed,
    resources,
    strings,
    variables,
)

UI = TERRAFORM / "ui.tf"


def _ui_resources() -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for entry in parsed(UI).get("resource", []):
        for rtype, named in entry.items():
            for name, body in named.items():
                out[f"{rtype}.{name}"] = body
    return out


def _service() -> dict[str, object]:
    return resources()["google_cloud_run_v2_service"]["ui"]


def _container() -> dict[str, object]:
    return block(block(_service(), "template"), "containers")


def test_the_ui_is_off_by_default_and_every_resource_of_it_hangs_on_the_switch():
    assert variables()["ui_enabled"]["default"] is False
    assert variables()["ui_read_only"]["default"] is False
    assert expr(locals_()["ui"]) == "var.ui_enabled ? {ui = true} : {}"
    gated = _ui_resources()
    assert len(gated) >= 6
    for name, body in gated.items():
        switch = expr(body.get("for_each", ""))
        assert "local.ui" in switch or "var.ui_enabled" in switch, name


def test_the_service_runs_orchestrator_ui_from_the_package_image_on_all_interfaces():
    container = _container()
    assert expr(container["image"]) == "local.migration_image"
    assert expr(container["args"]) == "local.ui_args"
    assert expr(locals_()["ui_args"]) == (
        'concat(["ui", "--host", "0.0.0.0", "--port", "8080"], '
        'var.ui_read_only ? ["--read-only"] : [])')
    assert block(container, "ports")["container_port"] == 8080
    dockerfile = (TERRAFORM / "migrations" / "Dockerfile").read_text()
    # The image installs the package from its wheel, as tests/test_ui_browser.py serves it.
    assert 'ENTRYPOINT ["orchestrator"]' in dockerfile
    assert "pip wheel" in dockerfile and "pip install /wheels/*.whl" in dockerfile


def test_the_service_gets_the_functions_settings_and_the_password_from_secret_manager():
    container = _container()
    dynamic = container["dynamic"][0]["env"]
    assert expr(dynamic["for_each"]) == "local.function_environment"
    password = [e for e in container["env"] if e.get("name") == "ORCHESTRATOR_DB_PASSWORD"]
    assert password and "value" not in password[0]
    ref = block(block(password[0], "value_source"), "secret_key_ref")
    assert expr(ref["secret"]) == "google_secret_manager_secret.db_password.secret_id"
    vpc = block(block(_service(), "template"), "vpc_access")
    assert expr(vpc["connector"]) == "google_vpc_access_connector.orchestrator.id"
    assert vpc["egress"] == "PRIVATE_RANGES_ONLY"


def test_only_named_invokers_may_open_it_never_the_public():
    service = _service()
    assert service["ingress"] == "INGRESS_TRAFFIC_ALL"  # the proxy reaches it from outside
    assert "invoker_iam_disabled" not in service
    grants = resources()["google_cloud_run_v2_service_iam_member"]
    invokers = [g for g in grants.values() if "google_cloud_run_v2_service.ui" in g["name"]]
    assert len(invokers) == 1
    assert invokers[0]["role"] == "roles/run.invoker"
    assert expr(invokers[0]["member"]) == "each.value"
    assert "var.ui_invokers" in expr(invokers[0]["for_each"])
    assert not set(variables()["ui_invokers"]["default"]) & PUBLIC_MEMBERS
    validation = block(variables()["ui_invokers"], "validation")
    assert "allUsers" in validation["condition"] and "allAuthenticatedUsers" in validation["condition"]


def test_its_own_service_account_gets_the_database_and_the_tasks_topic_only():
    service = _service()
    account = expr(block(service, "template")["service_account"])
    assert account == 'google_service_account.ui["ui"].email'
    functions = resources()["google_cloudfunctions2_function"].values()
    assert all("google_service_account.ui" not in " ".join(strings(f)) for f in functions)
    grants = {name: body for name, body in _ui_resources().items() if "_iam_" in name}
    roles = {name.split(".")[1]: expr(body["role"]) for name, body in grants.items()}
    assert roles == {"ui_cloudsql_client": "roles/cloudsql.client",
                     "ui_db_password": "roles/secretmanager.secretAccessor",
                     "ui_tasks_publisher": "roles/pubsub.publisher",
                     "ui_invokers": "roles/run.invoker"}
    publisher = grants["google_pubsub_topic_iam_member.ui_tasks_publisher"]
    assert expr(publisher["topic"]) == "google_pubsub_topic.tasks.name"
    assert "var.ui_read_only" in expr(publisher["for_each"])  # read-only publishes nothing
    secret = grants["google_secret_manager_secret_iam_member.ui_db_password"]
    assert expr(secret["secret_id"]) == "google_secret_manager_secret.db_password.secret_id"
    for body in grants.values():
        if "member" in body and "each.value" not in expr(body["member"]):
            assert 'google_service_account.ui["ui"].email' in expr(body["member"])


def test_one_instance_whose_connections_count_in_the_database_budget():
    scaling = block(block(_service(), "template"), "scaling")
    assert expr(scaling["max_instance_count"]) == "local.ui_max_instances"
    assert locals_()["ui_max_instances"] == 1
    assert "local.ui_connections" in expr(locals_()["connection_budget"])
    assert "local.connections_per_instance" in expr(locals_()["ui_connections"])


def test_the_output_says_how_to_open_it_with_your_google_identity():
    outputs = {k: v for entry in parsed(UI).get("output", []) for k, v in entry.items()}
    text = " ".join(strings(outputs["ui"]))
    assert "gcloud run services proxy" in text and "--port 8080" in text
