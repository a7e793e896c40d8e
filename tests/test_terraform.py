"""Static checks of the Terraform in terraform/: wiring, least privilege, contract.

Google Cloud cannot be reached from the test machine, so every `.tf` file is
parsed with python-hcl2 and the resulting configuration is inspected.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "terraform"
FUNCTIONS_MAIN = ROOT / "functions" / "main.py"

CONTRACT_ENTRY_POINTS = {"route", "on_object_finalized", "sweep", "status"}
PUBLIC_MEMBERS = {"allUsers", "allAuthenticatedUsers"}
PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}


# --- Normalising python-hcl2 output ------------------------------------------
# Depending on its version, python-hcl2 keeps the quotes of string literals and
# block labels ('"abc"'), wraps expressions in ${...}, marks blocks with
# "__is_block__" and keeps comments under "__comments__". The helpers below
# give plain Python values without those markers.

_MARKERS = {"__is_block__", "__comments__", "__inline_comments__"}


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1]
    return text


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {_unquote(k): _normalise(v) for k, v in value.items() if k not in _MARKERS}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, str):
        return _unquote(value)
    return value


def expr(value: Any) -> str:
    """An expression as text without a ${...} wrapper: '${var.x}' -> 'var.x'."""
    text = str(value)
    if text.startswith("${") and text.endswith("}") and text.count("${") == 1:
        return text[2:-1]
    return text


def block(body: Any, name: str) -> Any:
    """The first (usually only) nested block called name, or None."""
    found = body.get(name)
    if isinstance(found, list):
        return found[0] if found else None
    return found


def tf_files() -> list[Path]:
    return sorted(
        p
        for p in TERRAFORM.rglob("*.tf")
        if not {".terraform", ".build"} & set(p.relative_to(TERRAFORM).parts)
    )


@cache
def parsed(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return _normalise(hcl2.load(handle))


def root_files() -> list[Path]:
    return [p for p in tf_files() if p.parent == TERRAFORM]


def root_blocks(kind: str) -> Iterator[dict[str, Any]]:
    for path in root_files():
        yield from parsed(path).get(kind, [])


@cache
def resources() -> dict[str, dict[str, dict[str, Any]]]:
    """type -> name -> body, over the root module."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in root_blocks("resource"):
        for rtype, named in entry.items():
            for name, body in named.items():
                out.setdefault(rtype, {})[name] = body
    return out


@cache
def variables() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in root_blocks("variable"):
        out.update(entry)
    return out


@cache
def locals_() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in root_blocks("locals"):
        out.update(entry)
    return out


def functions() -> dict[str, dict[str, Any]]:
    return resources().get("google_cloudfunctions2_function", {})


def resolve(value: Any) -> Any:
    """Follow a reference to a local (local.a or local.a.b) to its value."""
    text = expr(value)
    match = re.fullmatch(r"local\.([A-Za-z_][\w-]*)((?:\.[A-Za-z_][\w-]*)*)", text)
    if not match:
        return value
    current: Any = locals_()[match.group(1)]
    for part in filter(None, match.group(2).split(".")):
        current = current[part]
    return current


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def all_resources() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for rtype, named in resources().items():
        for name, body in named.items():
            yield rtype, name, body


def referenced_by(value: Any, rtype: str, name: str) -> bool:
    return f"{rtype}.{name}." in " ".join(strings(value))


# --- Layout -------------------------------------------------------------------


def test_every_tf_file_parses_with_python_hcl2() -> None:
    files = tf_files()
    assert {"main.tf", "variables.tf", "outputs.tf", "versions.tf"} <= {
        p.name for p in root_files()
    }
    assert any(p.parent == TERRAFORM / "examples" / "minimal" for p in files)
    for path in files:
        assert isinstance(parsed(path), dict), path


def test_every_variable_is_typed_and_described() -> None:
    assert variables()
    for name, body in variables().items():
        assert body.get("type"), f"variable {name} has no type"
        assert str(body.get("description", "")).strip(), f"variable {name} has no description"


def test_versions_pin_a_range_of_the_google_provider() -> None:
    blocks = list(root_blocks("terraform"))
    providers: dict[str, Any] = {}
    for entry in blocks:
        for required in entry.get("required_providers", []):
            providers.update(required)
    google = providers["google"]
    assert google["source"] == "hashicorp/google"
    version = google["version"]
    assert re.search(r">=?\s*6", version) and re.search(r"<\s*7", version), version


# --- Functions and their triggers ------------------------------------------------


def test_the_four_functions_exist_with_the_contract_entry_points() -> None:
    entry_points = {
        expr(resolve(block(body, "build_config")["entry_point"])) for body in functions().values()
    }
    assert entry_points == CONTRACT_ENTRY_POINTS


def test_entry_points_are_top_level_functions_of_functions_main() -> None:
    if not FUNCTIONS_MAIN.exists():
        pytest.skip("functions/main.py is not there yet; the contract set was checked above")
    tree = ast.parse(FUNCTIONS_MAIN.read_text(encoding="utf-8"))
    defined = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    for name, body in functions().items():
        entry_point = expr(resolve(block(body, "build_config")["entry_point"]))
        assert entry_point in defined, f"{name}: {entry_point} is not defined in functions/main.py"


def _function_named(entry_point: str) -> tuple[str, dict[str, Any]]:
    for name, body in functions().items():
        if expr(resolve(block(body, "build_config")["entry_point"])) == entry_point:
            return name, body
    raise AssertionError(f"no function with entry point {entry_point}")


def test_every_function_has_a_trigger() -> None:
    rtype = "google_cloudfunctions2_function"
    subscriptions = resources().get("google_pubsub_subscription", {}).values()
    schedules = resources().get("google_cloud_scheduler_job", {}).values()
    for name, body in functions().items():
        entry_point = expr(resolve(block(body, "build_config")["entry_point"]))
        triggers = []
        if block(body, "event_trigger"):
            triggers.append("eventarc")
        if any(
            referenced_by(block(s, "push_config"), rtype, name)
            for s in subscriptions
            if block(s, "push_config")
        ):
            triggers.append("pubsub push")
        if any(referenced_by(block(j, "http_target"), rtype, name) for j in schedules):
            triggers.append("scheduler")
        if entry_point == "status":
            triggers.append("authenticated HTTP")
        assert triggers, f"function {name} has no trigger"


def test_on_object_finalized_is_an_eventarc_storage_trigger_on_the_landing_buckets() -> None:
    _, body = _function_named("on_object_finalized")
    trigger = block(body, "event_trigger")
    assert trigger["event_type"] == "google.cloud.storage.object.v1.finalized"
    assert trigger.get("service_account_email")
    filters = trigger["event_filters"]
    assert any(
        f["attribute"] == "bucket" and "google_storage_bucket.landing" in f["value"]
        for f in filters
    )


def test_sweep_is_run_by_a_cloud_scheduler_job_with_oidc() -> None:
    name, _ = _function_named("sweep")
    jobs = [
        j
        for j in resources().get("google_cloud_scheduler_job", {}).values()
        if referenced_by(block(j, "http_target"), "google_cloudfunctions2_function", name)
    ]
    assert jobs, "sweep has no Cloud Scheduler job"
    target = block(jobs[0], "http_target")
    assert block(target, "oidc_token")["service_account_email"]


def test_route_is_fed_by_push_subscriptions_on_tasks_and_dead_letter() -> None:
    name, _ = _function_named("route")
    topics = {
        expr(s["topic"])
        for s in resources()["google_pubsub_subscription"].values()
        if block(s, "push_config")
        and referenced_by(block(s, "push_config"), "google_cloudfunctions2_function", name)
    }
    assert topics == {"google_pubsub_topic.tasks.id", "google_pubsub_topic.dead_letter.id"}


def test_every_push_subscription_has_oidc_retry_backoff_and_dead_letter_policy() -> None:
    pushes = {
        n: s
        for n, s in resources()["google_pubsub_subscription"].items()
        if block(s, "push_config")
    }
    assert pushes
    for name, sub in pushes.items():
        oidc = block(block(sub, "push_config"), "oidc_token")
        assert oidc and oidc.get("service_account_email"), f"{name} pushes without OIDC"
        retry = block(sub, "retry_policy")
        assert retry and retry.get("minimum_backoff") and retry.get("maximum_backoff"), name
        dead_letter = block(sub, "dead_letter_policy")
        assert dead_letter and dead_letter.get("dead_letter_topic"), (
            f"{name} has no dead-letter policy"
        )
        assert dead_letter.get("max_delivery_attempts"), name


def test_pubsub_service_agent_can_dead_letter() -> None:
    topic_grants = resources()["google_pubsub_topic_iam_member"]
    sub_grants = resources()["google_pubsub_subscription_iam_member"]
    assert any(
        "pubsub_service_agent" in g["member"] and g["role"] == "roles/pubsub.publisher"
        for g in topic_grants.values()
    )
    assert any(
        "pubsub_service_agent" in g["member"] and g["role"] == "roles/pubsub.subscriber"
        for g in sub_grants.values()
    )


def test_every_function_sets_scaling_memory_timeout_and_the_settings_environment() -> None:
    for name, body in functions().items():
        service = block(body, "service_config")
        for key in (
            "max_instance_count",
            "available_memory",
            "timeout_seconds",
            "service_account_email",
        ):
            assert service.get(key) not in (None, ""), f"{name} lacks {key}"
        assert expr(service["environment_variables"]) == "local.function_environment", name
    # function_environment = merge(var.extra_environment, local.settings_environment):
    # the settings win over anything extra.
    merged = expr(locals_()["function_environment"]).replace(" ", "")
    assert merged == "merge(var.extra_environment,local.settings_environment)"


def test_database_password_is_a_mounted_secret_never_a_plain_variable() -> None:
    environment_text = " ".join(strings(locals_()["settings_environment"]))
    assert "PASSWORD" not in environment_text.upper().replace("ORCHESTRATOR_DB_PASSWORD", "")
    assert "random_password" not in environment_text
    assert "secret_data" not in environment_text
    database_url = [s for s in strings(locals_()["settings_environment"]) if "postgresql" in s]
    assert database_url and all(
        ":" not in s.split("://", 1)[1].split("@", 1)[0] for s in database_url
    )
    for name, body in functions().items():
        service = block(body, "service_config")
        assert expr(service["environment_variables"]) == "local.function_environment", name
        secrets = service.get("secret_environment_variables", [])
        assert any(
            s["key"] == "ORCHESTRATOR_DB_PASSWORD" and "google_secret_manager_secret" in s["secret"]
            for s in secrets
        ), f"{name} does not mount the password secret"


def test_the_job_runs_deploy_with_the_password_from_secret_manager() -> None:
    job = resources()["google_cloud_run_v2_job"]["migrate"]
    container = block(block(block(job, "template"), "template"), "containers")
    assert container["args"] == ["deploy"]
    envs = container.get("env", [])
    password = [e for e in envs if e.get("name") == "ORCHESTRATOR_DB_PASSWORD"]
    assert password and block(block(password[0], "value_source"), "secret_key_ref")
    assert "value" not in password[0]
    run = resources()["terraform_data"]["migrate"]
    assert "gcloud run jobs execute" in " ".join(strings(run))


# --- Least privilege -----------------------------------------------------------


def test_no_iam_grant_is_public_or_primitive() -> None:
    iam = [(t, n, b) for t, n, b in all_resources() if "_iam_" in t]
    assert iam
    for rtype, name, body in iam:
        members = body.get("members", []) + ([body["member"]] if "member" in body else [])
        for member in members:
            assert expr(member) not in PUBLIC_MEMBERS, f"{rtype}.{name} grants {member}"
        role = expr(body.get("role", ""))
        assert role not in PRIMITIVE_ROLES, f"{rtype}.{name} grants {role}"
    for text in (s for _, _, b in all_resources() for s in strings(b)):
        assert "allUsers" not in text and "allAuthenticatedUsers" not in text
    assert not set(variables()["status_invokers"].get("default", [])) & PUBLIC_MEMBERS


def test_each_function_runs_as_its_own_service_account() -> None:
    accounts = [
        expr(block(b, "service_config")["service_account_email"]) for b in functions().values()
    ]
    assert len(set(accounts)) == len(accounts)


def test_route_gets_bigquery_on_its_dataset_only_and_publishes_to_tasks() -> None:
    dataset_grants = resources()["google_bigquery_dataset_iam_member"].values()
    assert any(
        g["role"] == "roles/bigquery.dataEditor" and 'functions["route"]' in g["member"]
        for g in dataset_grants
    )
    project_roles = {expr(g["role"]) for g in resources()["google_project_iam_member"].values()}
    assert "roles/bigquery.dataEditor" not in project_roles
    assert "roles/pubsub.subscriber" not in project_roles
    tasks = resources()["google_pubsub_topic_iam_member"]["tasks_publisher"]
    assert tasks["role"] == "roles/pubsub.publisher"
    assert expr(tasks["topic"]) == "google_pubsub_topic.tasks.name"


# --- Data and database -----------------------------------------------------------


def test_buckets_have_uniform_access_public_access_prevention_and_lifecycle() -> None:
    buckets = resources()["google_storage_bucket"]
    for name, bucket in buckets.items():
        assert bucket["uniform_bucket_level_access"] is True, name
        assert bucket["public_access_prevention"] == "enforced", name
        assert bucket.get("lifecycle_rule"), name
    landing = buckets["landing"]
    assert block(landing, "versioning")["enabled"] is True or block(landing, "retention_policy")


def test_cloud_sql_has_private_ip_tls_and_automated_backups() -> None:
    instance = resources()["google_sql_database_instance"]["metadata"]
    settings = block(instance, "settings")
    ip = block(settings, "ip_configuration")
    assert ip["ipv4_enabled"] is False and ip.get("private_network")
    assert ip["ssl_mode"] in {"ENCRYPTED_ONLY", "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"}
    backups = block(settings, "backup_configuration")
    assert backups["enabled"] is True and backups["point_in_time_recovery_enabled"] is True


def _default(name: str) -> Any:
    return variables()[name]["default"]


def test_default_connection_budget_fits_the_server() -> None:
    sizes = _default("functions")
    per_instance = _default("db_pool_size") + _default("db_max_overflow")
    instances = (
        sizes["route"]["max_instances"]
        + sizes["on_object_finalized"]["max_instances"] * len(_default("landing_buckets"))
        + sizes["sweep"]["max_instances"]
        + sizes["status"]["max_instances"]
    )
    worst_case = instances * per_instance + per_instance + _default("db_reserved_connections")
    assert worst_case <= _default("db_max_connections")
    # The code's own defaults (pool 2, no overflow) are what the budget assumes.
    assert (_default("db_pool_size"), _default("db_max_overflow")) == (2, 0)
    instance = resources()["google_sql_database_instance"]["metadata"]
    precondition = block(block(instance, "lifecycle"), "precondition")
    assert "connection_budget" in precondition["condition"]


def test_every_checkov_skip_gives_a_reason() -> None:
    pattern = re.compile(r"checkov:skip=([A-Z0-9_]+)(.*)")
    for path in TERRAFORM.rglob("*"):
        if not path.is_file() or ".build" in path.parts or ".terraform" in path.parts:
            continue
        for line in path.read_text(encoding="utf-8", errors="ignore").splitlines():
            match = pattern.search(line)
            if match:
                reason = match.group(2).lstrip(":").strip()
                assert len(reason) >= 20, f"{path.name}: {match.group(1)} skipped without a reason"


# --- What the first apply needs ---------------------------------------------------


def _deployment() -> Any:
    from scripts.deployment import Deployment

    def computed(where: tuple[Any, ...], resource: Any) -> Any:
        return f"<{where[1]}.{where[2]}.{'.'.join(map(str, where[4]))}>"

    return Deployment.minimal(computed)


def test_terraform_sets_every_setting_the_deployed_functions_and_job_need() -> None:
    """Derived from the settings model: every setting says what the cloud needs of it,
    and each one the deployment must set is in the functions' and the job's
    environment (or mounted from Secret Manager), with the value it must have."""
    from orchestrator.bootstrap import BootstrapSettings
    from orchestrator.settings import DEFAULT, DEPLOYED, LOCAL, cloud_need, environment_name

    deployment = _deployment()
    environment = deployment.local("function_environment")
    secrets = {
        s["key"]
        for body in functions().values()
        for s in block(body, "service_config").get("secret_environment_variables", [])
    }
    job = resources()["google_cloud_run_v2_job"]["migrate"]
    container = block(block(block(job, "template"), "template"), "containers")
    job_env = {e["name"] for e in container.get("env", []) if "name" in e}
    assert "local.function_environment" in " ".join(strings(container.get("dynamic", [])))
    unclassified, missing, wrong = [], [], []
    for name, field in BootstrapSettings.model_fields.items():
        need = cloud_need(field)
        variable = environment_name(BootstrapSettings, name)
        if need is None:
            unclassified.append(name)
        elif need in (DEFAULT, LOCAL):
            continue
        elif variable not in environment and variable not in secrets & job_env:
            missing.append(variable)
        elif need != DEPLOYED and environment[variable] != need:
            wrong.append(f"{variable}={environment[variable]!r}, needs {need!r}")
    assert not unclassified, f"settings that do not say what the cloud needs: {unclassified}"
    assert not missing, f"terraform does not set {missing}"
    assert not wrong, wrong


def test_the_name_maps_send_the_pipelines_logical_names_to_terraforms_resources() -> None:
    import json

    environment = _deployment().local("function_environment")
    assert json.loads(environment["ORCHESTRATOR_BUCKETS"]) == {
        "landing": "my-project-orch-landing"}
    assert json.loads(environment["ORCHESTRATOR_DATASETS"]) == {"analytics": "orch_analytics"}
    assert environment["ORCHESTRATOR_BQ_DATASET"] == "analytics"
    assert environment["ORCHESTRATOR_BQ_LOCATION"] == "europe-west1"


def test_the_build_account_reads_the_bucket_cloud_functions_builds_from() -> None:
    """Cloud Functions copies the archive to gcf-v2-sources-<number>-<region> and builds
    from there as the build account: the grant the provider's builder example makes
    (roles/storage.objectAdmin), held to that bucket by a condition."""
    grant = resources()["google_project_iam_member"]["build_function_sources"]
    assert grant["role"] == "roles/storage.objectAdmin"
    assert expr(grant["member"]) == "serviceAccount:${google_service_account.build.email}"
    condition = block(grant, "condition")
    bucket = _deployment().local("function_sources_bucket")
    assert bucket == "gcf-v2-sources-<google_project.this.number>-europe-west1"
    assert "local.function_sources_bucket" in condition["expression"]
    assert "resource.name" in condition["expression"]
    # Every function's build waits for the build grants to settle.
    sleep = resources()["time_sleep"]["build_grants"]
    assert "google_project_iam_member.build_function_sources" in " ".join(sleep["depends_on"])
    for name, body in functions().items():
        assert "time_sleep.build_grants" in " ".join(body["depends_on"]), name
    assert "time_sleep.build_grants" in " ".join(
        resources()["terraform_data"]["migration_image"]["depends_on"])


def test_the_project_lookup_and_project_grants_have_their_api_enabled_first() -> None:
    apis = locals_()["apis"]
    assert "cloudresourcemanager.googleapis.com" in apis
    data = next(e["google_project"]["this"] for e in root_blocks("data")
                if "google_project" in e)
    assert "google_project_service.apis" in " ".join(data["depends_on"])


def test_the_database_version_is_one_the_provider_documents() -> None:
    documented = {"POSTGRES_14", "POSTGRES_15", "POSTGRES_16", "POSTGRES_17"}
    assert _default("db_version") in documented
    validation = block(variables()["db_version"], "validation")
    assert validation and "contains" in validation["condition"]


def test_destroy_abandons_the_private_services_peering() -> None:
    connection = resources()["google_service_networking_connection"]["private_services"]
    assert connection["deletion_policy"] == "ABANDON"


def test_the_budget_counts_the_jobs_connections() -> None:
    budget = expr(locals_()["connection_budget"]).replace(" ", "")
    functions_part = "local.function_instances*local.connections_per_instance"
    rest = budget.replace(functions_part, "", 1)
    assert "local.connections_per_instance" in rest and "var.db_reserved_connections" in rest


def test_the_archive_provider_reads_glob_excludes() -> None:
    providers: dict[str, Any] = {}
    for entry in root_blocks("terraform"):
        for required in entry.get("required_providers", []):
            providers.update(required)
    assert any(ch in p for p in _default("source_excludes") for ch in "*?[")
    assert re.search(r">=\s*2\.(5|[6-9])", providers["archive"]["version"])


def test_the_job_image_upload_leaves_terraform_state_and_variables_behind(tmp_path: Path) -> None:
    """`gcloud builds submit .` uploads the repository to build the job's image; what it
    would upload is asked of gcloud itself, from a copy of the repository in which a
    user has run terraform."""
    import shutil
    import subprocess

    if shutil.which("gcloud") is None:
        pytest.skip("gcloud is not installed")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
    planted = [
        "terraform/examples/minimal/terraform.tfstate",
        "terraform/examples/minimal/terraform.tfstate.backup",
        "terraform/examples/minimal/terraform.tfvars",
        "terraform/examples/minimal/.terraform/providers/registry/google",
        "terraform/.terraform/terraform.tfstate",
        "terraform/.build/function-source.zip",
        "terraform.tfstate",
        ".venv/bin/python",
        ".venv-gcs/bin/python",
        ".tmp/test-database-url",
        "orchestrator/__pycache__/x.pyc",
    ]
    for name in planted:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("secret")
    listed = subprocess.run(["gcloud", "meta", "list-files-for-upload", str(tmp_path)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not set(planted) & set(listed), sorted(set(planted) & set(listed))
    pipelines_dir = _deployment().variables["pipelines_dir"]
    needed = {"pyproject.toml", "README.md", "terraform/migrations/Dockerfile",
              "terraform/migrations/cloudbuild.yaml", "orchestrator/db/migrations/env.py",
              "functions/main.py", f"{pipelines_dir}/monthly_profit.yaml"}
    assert needed <= set(listed), sorted(needed - set(listed))


def test_every_make_target_the_docs_name_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    docs = [ROOT / "README.md", TERRAFORM / "README.md", *TERRAFORM.glob("*.tf"),
            *(TERRAFORM / "migrations").iterdir()]
    named = {m for path in docs for m in re.findall(r"`make ([a-z][\w-]*)`",
                                                    path.read_text(encoding="utf-8"))}
    assert {"function-source", "rehearse"} <= named | targets
    assert named <= targets, sorted(named - targets)


def test_the_function_source_carries_the_pipelines_and_never_local_state(tmp_path: Path) -> None:
    """The same walk and excludes as terraform's archive_file, over a repository in
    which someone has worked: virtualenvs, terraform state and caches stay out."""
    from scripts.deployment import archive_files

    deployment = _deployment()
    excludes = deployment.evaluate(
        next(e["archive_file"]["source"] for e in root_blocks("data") if "archive_file" in e)[
            "excludes"])
    planted = ["orchestrator/__init__.py", "functions/main.py", "requirements.txt",
               "examples/monthly_profit.yaml", "examples/sql/calculate_profit.sql",
               ".venv/bin/python", ".venv-gcs/lib/site.py", ".venv-bqemu/x", ".tmp/db-url",
               ".git", "terraform/examples/minimal/terraform.tfstate", "x/terraform.tfstate",
               "x/.terraform/p", "prod.tfvars", "orchestrator/__pycache__/a.pyc",
               "orchestrator.egg-info/PKG-INFO", "tests/test_x.py", ".hypothesis/db"]
    for name in planted:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    names = {n for n, _ in archive_files(tmp_path, excludes)}
    assert names == {"orchestrator/__init__.py", "functions/main.py", "requirements.txt",
                     "examples/monthly_profit.yaml", "examples/sql/calculate_profit.sql"}
    assert deployment.variables["pipelines_dir"] == "examples"
