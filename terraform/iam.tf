# One service account per role, each with the narrowest grants that work.
# Grants are additive (_iam_member), scoped to a single topic, subscription,
# bucket, dataset, secret or Cloud Run service wherever the API allows it.
# No allUsers, no allAuthenticatedUsers, no primitive roles.

locals {
  function_accounts = {
    route               = "fn-route"
    on_object_finalized = "fn-object"
    sweep               = "fn-sweep"
    status              = "fn-status"
  }

  # Roles that the engine needs wherever it runs.
  database_users = merge(
    { for k, sa in google_service_account.functions : k => sa.email },
    { migrate = google_service_account.migrate.email },
  )

  # Functions that move tasks forward publish run_task messages and events.
  publishers = {
    route               = google_service_account.functions["route"].email
    on_object_finalized = google_service_account.functions["on_object_finalized"].email
    sweep               = google_service_account.functions["sweep"].email
  }
}

resource "google_service_account" "functions" {
  for_each = local.function_accounts

  project      = var.project_id
  account_id   = "${var.name_prefix}-${each.value}"
  display_name = "Orchestrator ${each.key} function"
  description  = "Runtime identity of the ${each.key} function."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "push" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-push"
  display_name = "Orchestrator Pub/Sub push"
  description  = "Identity in the OIDC token of the push subscriptions that call route."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "eventarc" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-eventarc"
  display_name = "Orchestrator Eventarc trigger"
  description  = "Identity with which Eventarc calls on_object_finalized."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-scheduler"
  display_name = "Orchestrator Cloud Scheduler"
  description  = "Identity in the OIDC token with which Cloud Scheduler calls sweep."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "migrate" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-migrate"
  display_name = "Orchestrator migrations"
  description  = "Runtime identity of the migration job."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-build"
  display_name = "Orchestrator builds"
  description  = "Builds the function images and the migration image."

  depends_on = [google_project_service.apis]
}

# --- Database: connect and read the password -------------------------------

resource "google_project_iam_member" "cloudsql_client" {
  for_each = local.database_users

  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${each.value}"
}

resource "google_secret_manager_secret_iam_member" "db_password" {
  for_each = local.database_users

  project   = var.project_id
  secret_id = google_secret_manager_secret.db_password.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${each.value}"
}

# --- route: run warehouse jobs on the one dataset, read the landing files --

resource "google_project_iam_member" "route_bq_job_user" {
  project = var.project_id
  role    = "roles/bigquery.jobUser"
  member  = "serviceAccount:${google_service_account.functions["route"].email}"
}

resource "google_bigquery_dataset_iam_member" "route_data_editor" {
  for_each = google_bigquery_dataset.warehouse

  project    = var.project_id
  dataset_id = each.value.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = "serviceAccount:${google_service_account.functions["route"].email}"
}

resource "google_storage_bucket_iam_member" "route_landing_reader" {
  for_each = google_storage_bucket.landing

  bucket = each.value.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.functions["route"].email}"
}

# --- Publishing: tasks and batch-events only -------------------------------

resource "google_pubsub_topic_iam_member" "tasks_publisher" {
  for_each = local.publishers

  project = var.project_id
  topic   = google_pubsub_topic.tasks.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${each.value}"
}

resource "google_pubsub_topic_iam_member" "events_publisher" {
  for_each = local.publishers

  project = var.project_id
  topic   = google_pubsub_topic.batch_events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${each.value}"
}

# --- Who may call which function -------------------------------------------

resource "google_cloud_run_service_iam_member" "push_invokes_route" {
  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.route.service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.push.email}"
}

resource "google_cloud_run_service_iam_member" "eventarc_invokes_on_object_finalized" {
  for_each = google_cloudfunctions2_function.on_object_finalized

  project  = var.project_id
  location = var.region
  service  = each.value.service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.eventarc.email}"
}

resource "google_cloud_run_service_iam_member" "scheduler_invokes_sweep" {
  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.sweep.service_config[0].service
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.scheduler.email}"
}

resource "google_cloud_run_service_iam_member" "status_invokers" {
  for_each = toset(var.status_invokers)

  project  = var.project_id
  location = var.region
  service  = google_cloudfunctions2_function.status.service_config[0].service
  role     = "roles/run.invoker"
  member   = each.value
}

# --- Eventarc storage triggers ---------------------------------------------

resource "google_project_iam_member" "eventarc_receiver" {
  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = "serviceAccount:${google_service_account.eventarc.email}"
}

data "google_storage_project_service_account" "gcs" {
  project = var.project_id
}

# Cloud Storage publishes its notifications to topics that Eventarc creates
# and names itself, so this grant cannot be narrowed to one topic.
resource "google_project_iam_member" "gcs_agent_publisher" {
  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# --- Pub/Sub service agent: OIDC tokens and dead lettering ----------------

resource "google_service_account_iam_member" "pubsub_agent_token_creator" {
  service_account_id = google_service_account.push.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${local.pubsub_service_agent}"
}

resource "google_pubsub_topic_iam_member" "pubsub_agent_dead_letter_publisher" {
  for_each = {
    dead_letter        = google_pubsub_topic.dead_letter.name
    dead_letter_parked = google_pubsub_topic.dead_letter_parked.name
  }

  project = var.project_id
  topic   = each.value
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${local.pubsub_service_agent}"
}

resource "google_pubsub_subscription_iam_member" "pubsub_agent_subscriber" {
  for_each = {
    tasks_route       = google_pubsub_subscription.tasks_route.name
    dead_letter_route = google_pubsub_subscription.dead_letter_route.name
  }

  project      = var.project_id
  subscription = each.value
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${local.pubsub_service_agent}"
}

# --- Builds ----------------------------------------------------------------

resource "google_project_iam_member" "build_log_writer" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = "serviceAccount:${google_service_account.build.email}"
}

resource "google_artifact_registry_repository_iam_member" "build_writer" {
  project    = var.project_id
  location   = var.region
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.build.email}"
}

resource "google_storage_bucket_iam_member" "build_source_reader" {
  bucket = google_storage_bucket.source.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.build.email}"
}

# Cloud Functions copies the archive into its own bucket,
# gcf-v2-sources-<project number>-<region>, and the build fetches it from there as
# the build service account. The provider's own example of a function with a
# build service account grants roles/storage.objectAdmin on the project; the same
# role here reaches that one bucket only. The bucket appears with the first
# function, so the grant is a condition on its name rather than a bucket binding.
resource "google_project_iam_member" "build_function_sources" {
  project = var.project_id
  role    = "roles/storage.objectAdmin"
  member  = "serviceAccount:${google_service_account.build.email}"

  condition {
    title       = "gcf-v2-sources bucket only"
    description = "The bucket Cloud Functions builds from, in this region."
    expression  = "resource.name == \"projects/_/buckets/${local.function_sources_bucket}\" || resource.name.startsWith(\"projects/_/buckets/${local.function_sources_bucket}/\")"
  }
}

# As in the provider's example: new grants take a while to reach Cloud Build.
resource "time_sleep" "build_grants" {
  create_duration = "60s"

  depends_on = [
    google_project_iam_member.build_log_writer,
    google_project_iam_member.build_function_sources,
    google_artifact_registry_repository_iam_member.build_writer,
    google_storage_bucket_iam_member.build_source_reader,
  ]
}
