"""The deployment, rehearsed on this machine from terraform itself (`make rehearse`).

What terraform decides is read from it with python-hcl2 (`scripts.deployment`):
the root module with the inputs of `terraform/examples/minimal` and its
`terraform.tfvars.example`, the project id set to the emulators' project. From it:

- the function source archive, built as `data.archive_file.source` builds it (the same
  file set), unpacked into an empty folder and installed as the Python buildpack
  installs it: a fresh virtualenv, functions-framework, `pip install -r
  requirements.txt`. Nothing below imports the checkout;
- the deployment job: the image's ENTRYPOINT (its Dockerfile) with the job's args and
  environment (terraform), run from that installation, in the folder that holds the
  pipelines as the image's /app does;
- the four functions (entry point, signature, environment, per-bucket instances),
  each under functions-framework from the installation;
- Pub/Sub topics and subscriptions with their push endpoints, ack deadlines and
  dead-letter policies; the landing, access-log and source buckets; the datasets;
  the scheduler's target and method; Eventarc's bucket filter per function.

Substituted, because only Google runs them: the official Pub/Sub emulator,
gcp-storage-emulator and bqemulator behind the Google clients' emulator variables;
PostgreSQL on this machine for Cloud SQL (DATABASE_URL names it, through a proxy
the poison test cuts; the password secret is a fixed value); the function URIs,
resource ids and the project number that the provider computes; OIDC tokens (the
emulators check none); `ORCHESTRATOR_BQ_PARTITION_DECORATORS=false`, as bqemulator
has no partition decorators; Eventarc, by posting the binary CloudEvent it would
post, built from the uploaded object's own metadata; Cloud Scheduler, by calling the
sweep target every 2 s instead of every minute; and Pub/Sub's retry backoff, cut to
at most a second (terraform's 10 s to 600 s would make the dead-letter path take
minutes). The emulator does implement dead-letter policies, so the poison message
goes the real way: terraform's max_delivery_attempts failed pushes, the emulator
forwards it to the dead-letter topic with its delivery count, and the dead-letter
subscription pushes it back to route.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.db.session import make_engine
from orchestrator.examples_data import write_monthly_files
from scripts.deployment import Archive, Deployment, Resource, function_archive
from tests import rehearsal as r
from tests.conftest import ADMIN_URL
from tests.emulators import PROJECT, BqEmulator, GcsEmulator, bq_emulator, gcs_emulator  # noqa: F401
from tests.pubsub_emulator import PubSubEmulator, pubsub_emulator  # noqa: F401

pytestmark = [pytest.mark.emulator, pytest.mark.postgres]

PIPELINE = "monthly_profit"
GOOD_MONTH = "2024-03"
BAD_MONTH = "2024-04"
DB_PASSWORD = "rehearsal-secret"
PROJECT_NUMBER = "123456789012"
BATCH_TIMEOUT_S = 90


# -- the deployment and its installation -------------------------------------------------


class Computed:
    """The values the Google provider computes at apply time, as the rehearsal has them."""

    def __init__(self) -> None:
        self.function_urls: dict[tuple[str, Any], str] = {}
        self.archive_md5 = ""

    def __call__(self, where: tuple[Any, ...], resource: Resource) -> Any:
        kind, rtype, name, key, path = where
        if rtype == "google_cloudfunctions2_function" and path[:1] == ("service_config",):
            return {"uri": self.function_urls[(name, key)]}[path[-1]]
        if rtype == "google_pubsub_topic" and path == ("id",):
            return f"projects/{PROJECT}/topics/{resource.attribute(('name',))}"
        if rtype == "google_pubsub_subscription" and path == ("id",):
            return f"projects/{PROJECT}/subscriptions/{resource.attribute(('name',))}"
        if rtype == "google_service_account" and path in (("email",), ("id",)):
            email = f"{resource.attribute(('account_id',))}@{PROJECT}.iam.gserviceaccount.com"
            return email if path == ("email",) else f"projects/{PROJECT}/serviceAccounts/{email}"
        if (kind, rtype, path) == ("data", "google_project", ("number",)):
            return PROJECT_NUMBER
        if (kind, rtype, path) == ("data", "archive_file", ("output_md5",)):
            return self.archive_md5
        if rtype == "google_sql_database_instance" and path == ("private_ip_address",):
            return "127.0.0.1"
        raise AssertionError(f"the rehearsal has no value for {where}")


@pytest.fixture(scope="module")
def deployment() -> tuple[Deployment, Computed]:
    computed = Computed()
    return Deployment.minimal(computed, overrides={"project_id": PROJECT}), computed


@pytest.fixture(scope="module")
def archive(deployment: tuple[Deployment, Computed],
            tmp_path_factory: pytest.TempPathFactory) -> Archive:
    built = function_archive(deployment[0], tmp_path_factory.mktemp("build") / "source.zip")
    deployment[1].archive_md5 = hashlib.md5(built.path.read_bytes()).hexdigest()
    return built


@pytest.fixture(scope="module")
def installed(archive: Archive) -> r.Installed:
    return r.install(archive)


def fresh_database(prefix: str) -> str:
    admin = make_engine(ADMIN_URL, pool_size=1, max_overflow=0)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    admin = make_engine(ADMIN_URL, pool_size=1, max_overflow=0)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def revision(url: str) -> str | None:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


# -- Finding: an installed copy must migrate from anywhere --------------------------------


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_the_installed_package_migrates_from_any_working_directory(
        installed: r.Installed, tmp_path: Path, store: str) -> None:
    """The wheel pip built from the archive carries its migrations: `orchestrator db
    upgrade` works from an empty folder, with no source tree anywhere near it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    url = f"sqlite:///{tmp_path / 'meta.db'}" if store == "sqlite" else fresh_database("rh_mig")
    try:
        env = {**r.base_environment(tmp_path), "DATABASE_URL": url}
        proc = subprocess.run([str(installed.bin("orchestrator")), "db", "upgrade"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "up to date" in proc.stdout
        assert revision(url)
        assert list(elsewhere.iterdir()) == []
        site = next(installed.venv.glob("lib/python*/site-packages/orchestrator/db/migrations"))
        assert sorted(p.name for p in (site / "versions").glob("*.py"))
    finally:
        if store != "sqlite":
            drop_database(url)


# -- the whole deployment ------------------------------------------------------------


@dataclass
class Cloud:
    deployment: Deployment
    installed: r.Installed
    database: str  # what the operator and the job use
    proxy: r.TcpProxy  # the functions' route to it
    by_entry: dict[str, list[r.Function]]
    finalize_targets: dict[str, str]  # real bucket -> on_object_finalized URL
    landing: str  # the real name of the pipeline's `landing`
    datasets: dict[str, str]
    pubsub: PubSubEmulator
    gcs: GcsEmulator
    bq: BqEmulator
    job_output: str
    dead_letter_tap: str
    emulator_env: dict[str, str]

    def url(self, entry: str) -> str:
        return self.by_entry[entry][0].url

    def logs(self) -> str:
        return "\n".join(f"--- {f.label}\n{f.output()[-3000:]}"
                         for fns in self.by_entry.values() for f in fns)

    def status(self, batch_id: str) -> dict[str, Any] | None:
        code, doc = r.get_json(f"{self.url('status')}?batch_id={batch_id}&pipeline={PIPELINE}")
        return doc if code == 200 else None

    def wait_status(self, batch_id: str, want: set[str]) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            doc = self.status(batch_id)
            return doc if doc and doc["status"] in want else None

        try:
            return r.wait_for(done, BATCH_TIMEOUT_S, f"batch {batch_id} in {want}", every=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.status(batch_id)}\n{self.logs()}") from None

    def drop_month(self, folder: Path) -> list[int]:
        """Upload a month's files as a user would (Parquet first, the markers last), and
        deliver each object's finalize event as Eventarc does."""
        bucket = self.gcs.client().bucket(self.landing)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        ordered = [p for p in files if p.name != "_SUCCESS"] + [
            p for p in files if p.name == "_SUCCESS"]
        codes = []
        for path in ordered:
            name = path.relative_to(folder).as_posix()
            bucket.blob(name).upload_from_filename(str(path))
            blob = bucket.get_blob(name)
            headers, body = r.finalized_event(blob._properties)
            codes.append(r.post(self.finalize_targets[self.landing], headers, body))
        return codes


def provision_pubsub(d: Deployment, emulator: PubSubEmulator) -> str:
    from google.cloud import pubsub_v1
    from google.protobuf import duration_pb2

    publisher, subscriber = emulator._clients()
    for name in d.module.resources["google_pubsub_topic"]:
        publisher.create_topic(name=d.resource("google_pubsub_topic", name).attribute(("id",)))
    for name, body in d.module.resources["google_pubsub_subscription"].items():
        sub = d.resource("google_pubsub_subscription", name)
        request: dict[str, Any] = {
            "name": sub.attribute(("id",)),
            "topic": sub.attribute(("topic",)),
            "ack_deadline_seconds": sub.attribute(("ack_deadline_seconds",)),
        }
        if "push_config" in body:
            request["push_config"] = pubsub_v1.types.PushConfig(
                push_endpoint=sub.attribute(("push_config", 0, "push_endpoint")))
        if "dead_letter_policy" in body:
            request["dead_letter_policy"] = pubsub_v1.types.DeadLetterPolicy(
                dead_letter_topic=sub.attribute(("dead_letter_policy", 0, "dead_letter_topic")),
                max_delivery_attempts=sub.attribute(
                    ("dead_letter_policy", 0, "max_delivery_attempts")))
        if "retry_policy" in body:
            request["retry_policy"] = pubsub_v1.types.RetryPolicy(
                minimum_backoff=duration_pb2.Duration(nanos=200_000_000),
                maximum_backoff=duration_pb2.Duration(seconds=1))
        subscriber.create_subscription(request=request)
    # An observer on the dead-letter topic (not part of the deployment): it sees the
    # dead letter Pub/Sub forwards, with the delivery count Pub/Sub kept.
    tap = f"rehearsal-tap-{uuid.uuid4().hex[:6]}"
    dead_letter_topic = d.resource("google_pubsub_topic", "dead_letter").attribute(("name",))
    emulator.create_subscription(dead_letter_topic, tap)
    return tap


@pytest.fixture(scope="module")
def cloud(deployment: tuple[Deployment, Computed], installed: r.Installed, archive: Archive,
          pubsub_emulator: PubSubEmulator, gcs_emulator: GcsEmulator,  # noqa: F811
          bq_emulator: BqEmulator, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
          ) -> Iterator[Cloud]:
    d, computed = deployment
    logs = tmp_path_factory.mktemp("rehearsal-logs")
    home = tmp_path_factory.mktemp("rehearsal-home")
    fns = r.functions(d)
    for fn in fns:
        computed.function_urls[(fn.resource.name, fn.resource.key)] = fn.url

    # Buckets, the archive in its source bucket, datasets, topics and subscriptions.
    client = gcs_emulator.client()
    for name, body in d.module.resources["google_storage_bucket"].items():
        resource = d.resource("google_storage_bucket", name)
        for instance in (resource.instances().values() if "for_each" in body else [resource]):
            gcs_emulator.ensure_bucket(instance.attribute(("name",)))
    source = d.resource("google_storage_bucket_object", "source")
    client.bucket(source.attribute(("bucket",))).blob(source.attribute(("name",))) \
        .upload_from_filename(str(archive.path))
    datasets = {k: v.attribute(("dataset_id",)) for k, v in
                d.resource("google_bigquery_dataset", "warehouse").instances().items()}
    for dataset in datasets.values():
        bq_emulator.ensure_dataset(dataset)
    tap = provision_pubsub(d, pubsub_emulator)

    emulators = {"PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
                 "STORAGE_EMULATOR_HOST": gcs_emulator.endpoint,
                 "BIGQUERY_EMULATOR_HOST": bq_emulator.endpoint,
                 "ORCHESTRATOR_BQ_PARTITION_DECORATORS": "false"}
    database = fresh_database("rh_cloud")
    proxy = r.TcpProxy((make_url(database).host or "127.0.0.1", make_url(database).port or 5432))
    through_proxy = make_url(database).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)
    secrets = {"ORCHESTRATOR_DB_PASSWORD": DB_PASSWORD}

    # The deployment job: the image's entrypoint with the job's args and environment.
    job = d.resource("google_cloud_run_v2_job", "migrate")
    container = ("template", 0, "template", 0, "containers", 0)
    args = job.attribute((*container, "args"))
    job_env = {**d.local("function_environment"), **secrets, **emulators,
               "DATABASE_URL": database}
    assert "dynamic" in job.body["template"][0]["template"][0]["containers"][0]
    proc = subprocess.run([str(installed.bin(r.entrypoint()[0])), *r.entrypoint()[1:], *args],
                          cwd=installed.workspace, env={**r.base_environment(home), **job_env},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def env_of(fn: r.Function) -> dict[str, str]:
        return {**r.base_environment(home), **fn.environment(secrets), **emulators,
                "DATABASE_URL": through_proxy}

    finalize_targets = {}
    for fn in fns:
        for f in fn.resource.attribute(("event_trigger", 0, "event_filters")) \
                if "event_trigger" in fn.resource.body else []:
            if f["attribute"] == "bucket":
                finalize_targets[f["value"]] = fn.url
    by_entry: dict[str, list[r.Function]] = {}
    for fn in fns:
        by_entry.setdefault(fn.entry_point(), []).append(fn)
    landing = d.resource("google_storage_bucket", "landing", "landing").attribute(("name",))
    try:
        with r.started(fns, installed, env_of, logs):
            yield Cloud(d, installed, database, proxy, by_entry, finalize_targets, landing,
                        datasets, pubsub_emulator, gcs_emulator, bq_emulator, proc.stdout, tap,
                        emulators)
    finally:
        proxy.close()
        drop_database(database)


@pytest.fixture(scope="module")
def scheduler(cloud: Cloud) -> Iterator[r.Scheduler]:
    job = cloud.deployment.resource("google_cloud_scheduler_job", "sweep")
    target = ("http_target", 0)
    with r.Scheduler(job.attribute((*target, "http_method")), job.attribute((*target, "uri"))) \
            as running:
        yield running


def test_the_deployment_job_migrates_the_database_and_stores_the_pipelines(cloud: Cloud) -> None:
    assert cloud.deployment.variables["pipelines_dir"] == "examples"
    assert f"{PIPELINE}: synced (version 1)" in cloud.job_output
    assert revision(cloud.database)
    engine = make_engine(cloud.database, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            triggers = conn.execute(text(
                "SELECT t.name, t.gcs_bucket FROM tasks t JOIN pipelines p "
                "ON p.id = t.pipeline_id WHERE p.name = :p AND t.gcs_bucket IS NOT NULL"),
                {"p": PIPELINE}).all()
    finally:
        engine.dispose()
    # Stored as the pipeline names them; the settings map them at the edges.
    assert sorted(triggers) == [("load_expenses", "landing"), ("load_sales", "landing")]
    assert cloud.landing == f"{PROJECT}-orch-landing"


def test_a_month_dropped_into_the_landing_bucket_runs_to_success_and_the_profit_is_in_bigquery(
        cloud: Cloud, scheduler: r.Scheduler, tmp_path: Path) -> None:
    from google.cloud import bigquery

    expected = write_monthly_files(tmp_path / "month", GOOD_MONTH, seed=17)
    codes = cloud.drop_month(tmp_path / "month")
    assert codes and all(200 <= c < 300 for c in codes), codes
    doc = cloud.wait_status(GOOD_MONTH, {"SUCCESS", "FAILED", "CANCELLED"})
    assert doc["status"] == "SUCCESS", (doc, cloud.logs())
    assert {t["task"]: t["status"] for t in doc["tasks"]} == {
        "load_sales": "SUCCESS", "load_expenses": "SUCCESS", "calculate_profit": "SUCCESS"}
    sales_load = next(t for t in doc["tasks"] if t["task"] == "load_sales")
    assert sales_load["output"]["table"] == "analytics.sales"

    dataset = cloud.datasets["analytics"]
    job = cloud.bq.client().query(
        f"SELECT month, region, revenue, expenses, profit FROM `{PROJECT}.{dataset}.profit` "
        "WHERE month = @m ORDER BY region",
        job_config=bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter("m", "DATE", date.fromisoformat(f"{GOOD_MONTH}-01"))]))
    rows = [dict(row.items()) for row in job.result(timeout=60)]
    assert rows == expected


@pytest.fixture(scope="module")
def bad_month(cloud: Cloud, scheduler: r.Scheduler,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from orchestrator.demo import write_bad_expenses

    folder = tmp_path_factory.mktemp("bad-month")
    write_monthly_files(folder, BAD_MONTH, seed=3)
    for stale in (folder / "expenses" / BAD_MONTH).iterdir():
        stale.unlink()
    write_bad_expenses(folder, BAD_MONTH)
    codes = cloud.drop_month(folder)
    assert all(200 <= c < 300 for c in codes), codes
    return cloud.wait_status(BAD_MONTH, {"SUCCESS", "FAILED", "CANCELLED"})


def test_a_bad_file_fails_its_load_and_the_profit_is_upstream_failed(
        bad_month: dict[str, Any]) -> None:
    assert bad_month["status"] == "FAILED"
    tasks = {t["task"]: t for t in bad_month["tasks"]}
    assert tasks["load_sales"]["status"] == "SUCCESS"
    assert tasks["load_expenses"]["status"] == "ERROR"
    # BigQuery's own words for a file without the amount column, naming the real bucket.
    error = tasks["load_expenses"]["error"] or ""
    assert error.startswith("PermanentError: BigQuery:"), error
    assert f"gs://{PROJECT}-orch-landing/expenses/{BAD_MONTH}/" in error
    assert tasks["calculate_profit"]["status"] == "UPSTREAM_FAILED"


def test_a_message_route_can_never_process_ends_in_the_task_log_with_pubsubs_delivery_count(
        cloud: Cloud, bad_month: dict[str, Any], tmp_path: Path) -> None:
    """The functions lose the database; the operator retries the failed load from
    outside (the CLI, with its own connection). Every push of its run message fails,
    Pub/Sub dead-letters it after max_delivery_attempts, and once the database is
    back, route folds the dead letter into the task log with Pub/Sub's count."""
    max_attempts = cloud.deployment.resource("google_pubsub_subscription", "tasks_route") \
        .attribute(("dead_letter_policy", 0, "max_delivery_attempts"))
    operator_env = {**r.base_environment(tmp_path), **cloud.emulator_env,
                    **cloud.deployment.local("function_environment"),
                    "DATABASE_URL": cloud.database, "ORCHESTRATOR_LOG_FORMAT": "text"}
    cloud.proxy.cut()
    try:
        retry = subprocess.run(
            [str(cloud.installed.bin("orchestrator")), "batch", "retry", BAD_MONTH,
             "-p", PIPELINE], cwd=tmp_path, env=operator_env, capture_output=True, text=True,
            timeout=60)
        assert retry.returncode == 0, retry.stderr
        assert "1 task(s) queued again" in retry.stderr
        (dead,) = cloud.pubsub.pull(cloud.dead_letter_tap, want=1, timeout=120)
    finally:
        cloud.proxy.restore()
    count = int(dead.attributes["CloudPubSubDeadLetterSourceDeliveryCount"])
    assert count == max_attempts
    assert json.loads(dead.data)["task"] == "load_expenses"

    def recorded() -> str | None:
        engine = make_engine(cloud.database, pool_size=1, max_overflow=0)
        try:
            with engine.connect() as conn:
                return conn.execute(text(
                    "SELECT l.error FROM task_log l JOIN tasks t ON t.id = l.task_id "
                    "JOIN batches b ON b.id = l.batch_pk WHERE b.batch_id = :b "
                    "AND t.name = 'load_expenses' AND l.status = 'ERROR' "
                    "AND l.error LIKE 'dead-lettered%'"), {"b": BAD_MONTH}).scalar()
        finally:
            engine.dispose()

    try:
        error = r.wait_for(recorded, 60, "the dead letter in the task log")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cloud.logs()}") from None
    assert error == f"dead-lettered after {count} delivery attempts"
    doc = cloud.wait_status(BAD_MONTH, {"FAILED"})
    assert {t["task"]: t["status"] for t in doc["tasks"]}["calculate_profit"] == "UPSTREAM_FAILED"
    assert os.environ.get("ORCHESTRATOR_FAILPOINTS") is None
