# The four Cloud Functions (2nd gen) and the triggers that run them:
#   route                Pub/Sub push subscriptions (tasks, dead-letter), OIDC
#   on_object_finalized  Eventarc, google.cloud.storage.object.v1.finalized, one per landing bucket
#   sweep                Cloud Scheduler, HTTP POST with OIDC, every minute
#   status               HTTP GET, IAM-authenticated callers only

locals {
  # What the settings read in the cloud (tests/test_terraform.py derives the list
  # from the settings model). DATABASE_URL carries no password: the code adds
  # ORCHESTRATOR_DB_PASSWORD, which comes from Secret Manager.
  settings_environment = {
    DATABASE_URL                 = "postgresql+psycopg2://${var.db_user}@${google_sql_database_instance.metadata.private_ip_address}:5432/${var.db_name}?sslmode=require"
    ORCHESTRATOR_RUNTIME         = "cloud"
    ORCHESTRATOR_GCP_PROJECT     = var.project_id
    ORCHESTRATOR_TASKS_TOPIC     = google_pubsub_topic.tasks.name
    ORCHESTRATOR_EVENTS_TOPIC    = google_pubsub_topic.batch_events.name
    ORCHESTRATOR_DB_POOL_SIZE    = tostring(var.db_pool_size)
    ORCHESTRATOR_DB_MAX_OVERFLOW = tostring(var.db_max_overflow)
    ORCHESTRATOR_PIPELINES_DIR   = var.pipelines_dir
    ORCHESTRATOR_WAREHOUSE       = "bigquery"
    ORCHESTRATOR_OBJECT_STORE    = "gcs"
    ORCHESTRATOR_BUCKETS         = jsonencode({ for k, b in google_storage_bucket.landing : k => b.name })
    ORCHESTRATOR_DATASETS        = jsonencode({ for k, d in google_bigquery_dataset.warehouse : k => d.dataset_id })
    ORCHESTRATOR_BQ_DATASET      = var.bq_default_dataset
    ORCHESTRATOR_BQ_LOCATION     = local.bq_location
    ORCHESTRATOR_LOG_FORMAT      = var.log_format
    ORCHESTRATOR_ALERTS_TOPIC    = google_pubsub_topic.alerts.name
    ORCHESTRATOR_ALERT_EVENTS    = join(",", var.alert_events)
  }

  # The settings win over extra_environment.
  function_environment = merge(var.extra_environment, local.settings_environment)

  # functions/main.py lives below the archive root.
  build_environment = {
    GOOGLE_FUNCTION_SOURCE = "functions/main.py"
  }
}

resource "google_cloudfunctions2_function" "route" {
  project     = var.project_id
  name        = "${var.name_prefix}-route"
  location    = var.region
  description = "Routes start_batch, run_task and dead-lettered messages into the engine."
  labels      = local.labels

  build_config {
    runtime               = var.python_runtime
    entry_point           = local.entry_points.route
    environment_variables = local.build_environment
    docker_repository     = google_artifact_registry_repository.images.id
    service_account       = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    max_instance_count               = var.functions["route"].max_instances
    min_instance_count               = 0
    max_instance_request_concurrency = 1
    available_memory                 = var.functions["route"].memory
    available_cpu                    = var.functions["route"].cpu
    timeout_seconds                  = var.functions["route"].timeout_seconds
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.functions["route"].email
    vpc_connector                    = google_vpc_access_connector.orchestrator.id
    vpc_connector_egress_settings    = "PRIVATE_RANGES_ONLY"
    environment_variables            = local.function_environment

    secret_environment_variables {
      key        = "ORCHESTRATOR_DB_PASSWORD"
      project_id = var.project_id
      secret     = google_secret_manager_secret.db_password.secret_id
      version    = "latest"
    }
  }

  depends_on = [
    google_secret_manager_secret_iam_member.db_password,
    time_sleep.build_grants,
    terraform_data.migrate,
  ]
}

resource "google_cloudfunctions2_function" "on_object_finalized" {
  for_each = local.landing_buckets

  project     = var.project_id
  name        = "${var.name_prefix}-on-object-finalized-${each.key}"
  location    = var.region
  description = "Starts the load tasks that a new object in gs://${each.value} belongs to."
  labels      = local.labels

  build_config {
    runtime               = var.python_runtime
    entry_point           = local.entry_points.on_object_finalized
    environment_variables = local.build_environment
    docker_repository     = google_artifact_registry_repository.images.id
    service_account       = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    max_instance_count               = var.functions["on_object_finalized"].max_instances
    min_instance_count               = 0
    max_instance_request_concurrency = 1
    available_memory                 = var.functions["on_object_finalized"].memory
    available_cpu                    = var.functions["on_object_finalized"].cpu
    timeout_seconds                  = var.functions["on_object_finalized"].timeout_seconds
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.functions["on_object_finalized"].email
    vpc_connector                    = google_vpc_access_connector.orchestrator.id
    vpc_connector_egress_settings    = "PRIVATE_RANGES_ONLY"
    environment_variables            = local.function_environment

    secret_environment_variables {
      key        = "ORCHESTRATOR_DB_PASSWORD"
      project_id = var.project_id
      secret     = google_secret_manager_secret.db_password.secret_id
      version    = "latest"
    }
  }

  event_trigger {
    trigger_region        = var.region
    event_type            = "google.cloud.storage.object.v1.finalized"
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.eventarc.email

    event_filters {
      attribute = "bucket"
      value     = google_storage_bucket.landing[each.key].name
    }
  }

  depends_on = [
    google_secret_manager_secret_iam_member.db_password,
    time_sleep.build_grants,
    google_project_iam_member.eventarc_receiver,
    google_project_iam_member.gcs_agent_publisher,
    terraform_data.migrate,
  ]
}

resource "google_cloudfunctions2_function" "sweep" {
  project     = var.project_id
  name        = "${var.name_prefix}-sweep"
  location    = var.region
  description = "Periodic maintenance and the clock: re-publishes unclaimed tasks, expires leases, closes finished batches, starts scheduled batches, applies deadlines, sends alerts."
  labels      = local.labels

  build_config {
    runtime               = var.python_runtime
    entry_point           = local.entry_points.sweep
    environment_variables = local.build_environment
    docker_repository     = google_artifact_registry_repository.images.id
    service_account       = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    max_instance_count               = var.functions["sweep"].max_instances
    min_instance_count               = 0
    max_instance_request_concurrency = 1
    available_memory                 = var.functions["sweep"].memory
    available_cpu                    = var.functions["sweep"].cpu
    timeout_seconds                  = var.functions["sweep"].timeout_seconds
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.functions["sweep"].email
    vpc_connector                    = google_vpc_access_connector.orchestrator.id
    vpc_connector_egress_settings    = "PRIVATE_RANGES_ONLY"
    environment_variables            = local.function_environment

    secret_environment_variables {
      key        = "ORCHESTRATOR_DB_PASSWORD"
      project_id = var.project_id
      secret     = google_secret_manager_secret.db_password.secret_id
      version    = "latest"
    }

    # The alert webhook's URL (see alerts.tf): only sweep delivers alerts.
    dynamic "secret_environment_variables" {
      for_each = var.alert_webhook_secret == null ? [] : [var.alert_webhook_secret]
      content {
        key        = "ORCHESTRATOR_ALERT_WEBHOOK_URL"
        project_id = var.project_id
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  depends_on = [
    google_secret_manager_secret_iam_member.db_password,
    google_secret_manager_secret_iam_member.alert_webhook,
    time_sleep.build_grants,
    terraform_data.migrate,
  ]
}

resource "google_cloudfunctions2_function" "status" {
  # checkov:skip=CKV_GCP_124: status is the user-facing endpoint and must be reachable from outside the VPC; every call needs an identity token of a status_invokers member (run.invoker), and no public binding exists
  project     = var.project_id
  name        = "${var.name_prefix}-status"
  location    = var.region
  description = "HTTP GET ?batch_id=...&pipeline=... returns the status of a batch as JSON; callers must be authenticated."
  labels      = local.labels

  build_config {
    runtime               = var.python_runtime
    entry_point           = local.entry_points.status
    environment_variables = local.build_environment
    docker_repository     = google_artifact_registry_repository.images.id
    service_account       = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    max_instance_count               = var.functions["status"].max_instances
    min_instance_count               = 0
    max_instance_request_concurrency = 1
    available_memory                 = var.functions["status"].memory
    available_cpu                    = var.functions["status"].cpu
    timeout_seconds                  = var.functions["status"].timeout_seconds
    # Reachable from outside the project, but only with an identity token of
    # a member of status_invokers (no allUsers binding exists).
    ingress_settings               = "ALLOW_ALL"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.functions["status"].email
    vpc_connector                  = google_vpc_access_connector.orchestrator.id
    vpc_connector_egress_settings  = "PRIVATE_RANGES_ONLY"
    environment_variables          = local.function_environment

    secret_environment_variables {
      key        = "ORCHESTRATOR_DB_PASSWORD"
      project_id = var.project_id
      secret     = google_secret_manager_secret.db_password.secret_id
      version    = "latest"
    }
  }

  depends_on = [
    google_secret_manager_secret_iam_member.db_password,
    time_sleep.build_grants,
    terraform_data.migrate,
  ]
}

resource "google_cloud_scheduler_job" "sweep" {
  project          = var.project_id
  name             = "${var.name_prefix}-sweep"
  region           = var.region
  description      = "Runs the sweep function."
  schedule         = var.sweep_schedule
  time_zone        = "Etc/UTC"
  attempt_deadline = "${var.functions["sweep"].timeout_seconds + 10}s"

  # The next tick is a minute away: a missed sweep is not worth a retry.
  retry_config {
    retry_count = 0
  }

  http_target {
    http_method = "POST"
    uri         = google_cloudfunctions2_function.sweep.service_config[0].uri

    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = google_cloudfunctions2_function.sweep.service_config[0].uri
    }
  }

  depends_on = [google_cloud_run_service_iam_member.scheduler_invokes_sweep]
}
