# The web UI (`orchestrator ui`), optional and off by default: a Cloud Run service
# running the migration job's image (the package, with `orchestrator` as entrypoint)
# against the same Cloud SQL database, reachable only with an identity that holds
# roles/run.invoker on it. Open it with your own Google identity:
#
#   gcloud run services proxy <name_prefix>-ui --project <project> --region <region> --port 8080
#
# then browse http://localhost:8080/. No allUsers, no allAuthenticatedUsers: the
# service refuses every request that carries no token of an invoker.

variable "ui_enabled" {
  type        = bool
  description = "Deploy the web UI as a Cloud Run service (IAM-authenticated; open it with `gcloud run services proxy`)."
  default     = false
}

variable "ui_read_only" {
  type        = bool
  description = "Run the web UI with --read-only: pages only, no start, retry or cancel, and no grant to publish to the tasks topic."
  default     = false
}

variable "ui_invokers" {
  type        = list(string)
  description = "IAM members (user:, group:, serviceAccount:) allowed to open the web UI. It always requires authentication."
  default     = []

  validation {
    condition     = alltrue([for m in var.ui_invokers : !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "The web UI requires authentication: allUsers and allAuthenticatedUsers are refused."
  }
}

locals {
  ui = var.ui_enabled ? { ui = true } : {}

  # One instance: the UI is a tool for a few people, and its form tokens are signed
  # by a per-process secret. Its connections count in the database budget.
  ui_max_instances = 1
  ui_connections   = var.ui_enabled ? local.ui_max_instances * local.connections_per_instance : 0

  ui_args = concat(["ui", "--host", "0.0.0.0", "--port", "8080"],
  var.ui_read_only ? ["--read-only"] : [])
}

resource "google_service_account" "ui" {
  for_each = local.ui

  project      = var.project_id
  account_id   = "${var.name_prefix}-ui"
  display_name = "Orchestrator web UI"
  description  = "Runtime identity of the web UI's Cloud Run service."

  depends_on = [google_project_service.apis]
}

# Reads and writes the task log, as the functions do: connect, and read the password.
resource "google_project_iam_member" "ui_cloudsql_client" {
  for_each = local.ui

  project = var.project_id
  role    = "roles/cloudsql.client"
  member  = "serviceAccount:${google_service_account.ui["ui"].email}"
}

resource "google_secret_manager_secret_iam_member" "ui_db_password" {
  for_each = local.ui

  project   = var.project_id
  secret_id = google_secret_manager_secret.db_password.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.ui["ui"].email}"
}

# Start and retry publish run_task messages for route, as `orchestrator batch` does.
resource "google_pubsub_topic_iam_member" "ui_tasks_publisher" {
  for_each = var.ui_read_only ? {} : local.ui

  project = var.project_id
  topic   = google_pubsub_topic.tasks.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.ui["ui"].email}"
}

resource "google_cloud_run_v2_service" "ui" {
  for_each = local.ui

  project             = var.project_id
  name                = "${var.name_prefix}-ui"
  location            = var.region
  description         = "Web UI over the orchestrator's task log (orchestrator ui)."
  labels              = local.labels
  deletion_protection = var.deletion_protection
  # Reached through `gcloud run services proxy` from a workstation, so not internal
  # only; every request still needs an invoker's identity token.
  ingress = "INGRESS_TRAFFIC_ALL"

  template {
    service_account                  = google_service_account.ui["ui"].email
    max_instance_request_concurrency = 40
    timeout                          = "900s"

    scaling {
      min_instance_count = 0
      max_instance_count = local.ui_max_instances
    }

    vpc_access {
      connector = google_vpc_access_connector.orchestrator.id
      egress    = "PRIVATE_RANGES_ONLY"
    }

    containers {
      image = local.migration_image
      args  = local.ui_args

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = "1"
          memory = "512Mi"
        }
        cpu_idle = true
      }

      startup_probe {
        http_get {
          path = "/static/ui.css"
        }
      }

      dynamic "env" {
        for_each = local.function_environment
        content {
          name  = env.key
          value = env.value
        }
      }

      env {
        name = "ORCHESTRATOR_DB_PASSWORD"
        value_source {
          secret_key_ref {
            secret  = google_secret_manager_secret.db_password.secret_id
            version = "latest"
          }
        }
      }
    }
  }

  depends_on = [
    terraform_data.migration_image,
    google_secret_manager_secret_iam_member.ui_db_password,
    google_secret_manager_secret_version.db_password,
    terraform_data.migrate,
  ]
}

resource "google_cloud_run_v2_service_iam_member" "ui_invokers" {
  for_each = var.ui_enabled ? toset(var.ui_invokers) : toset([])

  project  = var.project_id
  location = var.region
  name     = google_cloud_run_v2_service.ui["ui"].name
  role     = "roles/run.invoker"
  member   = each.value
}

output "ui" {
  description = "The web UI's service URL and the command that opens it with your Google identity (null unless ui_enabled)."
  value = var.ui_enabled ? {
    url   = google_cloud_run_v2_service.ui["ui"].uri
    proxy = "gcloud run services proxy ${google_cloud_run_v2_service.ui["ui"].name} --project ${var.project_id} --region ${var.region} --port 8080"
  } : null
}
