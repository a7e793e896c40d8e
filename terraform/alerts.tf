# Alerts: the `alerts` Pub/Sub topic, the webhook URL's secret, and an optional
# Cloud Monitoring alert policy on the structured log of a failed batch.
#
# The sweep function is the only one that sends alerts: it derives them from the
# task log's transitions and delivers them from their outbox, so only its identity
# publishes to the topic and reads the webhook secret. Wire email, Chat, PagerDuty
# or anything else to the topic with a subscription of your own.

variable "alerts_topic" {
  type        = string
  description = "Name of the Pub/Sub topic that receives every alert (JSON of schema orchestrator.alert/v1, attributes kind, severity, pipeline, batch_id, alert_id)."
  default     = "alerts"
}

variable "alert_events" {
  type        = list(string)
  description = "What alerts when a pipeline file says nothing (ORCHESTRATOR_ALERT_EVENTS): batch_failed, task_failed, deadline_missed, deadline_warning, file_late, batch_succeeded."
  default     = ["batch_failed", "deadline_missed", "deadline_warning", "file_late"]

  validation {
    condition = alltrue([for e in var.alert_events : contains(
    ["batch_failed", "task_failed", "deadline_missed", "deadline_warning", "file_late", "batch_succeeded"], e)])
    error_message = "alert_events may list batch_failed, task_failed, deadline_missed, deadline_warning, file_late and batch_succeeded."
  }
}

variable "alert_webhook_secret" {
  type        = string
  description = "Optional: the id of a Secret Manager secret in this project whose latest version is the URL of a webhook that takes a Slack-compatible message. The sweep function gets it as ORCHESTRATOR_ALERT_WEBHOOK_URL; the URL never appears in Terraform state or a pipeline file."
  default     = null
}

variable "batch_failed_alert_policy" {
  type        = bool
  description = "Create a Cloud Monitoring alert policy that fires on the structured log line of a failed batch (jsonPayload.event = \"batch_failed\")."
  default     = false
}

variable "alert_notification_channels" {
  type        = list(string)
  description = "Cloud Monitoring notification channel ids (projects/P/notificationChannels/N) for the batch-failed alert policy."
  default     = []
}

resource "google_pubsub_topic" "alerts" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  project = var.project_id
  name    = var.alerts_topic
  labels  = local.labels

  # A subscriber added later can seek back over a week of alerts.
  message_retention_duration = "604800s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic_iam_member" "alerts_publisher" {
  project = var.project_id
  topic   = google_pubsub_topic.alerts.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.functions["sweep"].email}"
}

resource "google_secret_manager_secret_iam_member" "alert_webhook" {
  count = var.alert_webhook_secret == null ? 0 : 1

  project   = var.project_id
  secret_id = var.alert_webhook_secret
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.functions["sweep"].email}"
}

resource "google_project_service" "monitoring" {
  count = var.batch_failed_alert_policy && var.enable_apis ? 1 : 0

  project            = var.project_id
  service            = "monitoring.googleapis.com"
  disable_on_destroy = false
}

resource "google_monitoring_alert_policy" "batch_failed" {
  count = var.batch_failed_alert_policy ? 1 : 0

  project               = var.project_id
  display_name          = "${var.name_prefix}: a batch failed"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels
  user_labels           = local.labels

  conditions {
    display_name = "Log line of a failed batch"

    condition_matched_log {
      filter = join(" AND ", [
        "resource.type=\"cloud_run_revision\"",
        "resource.labels.service_name=~\"^${var.name_prefix}-\"",
        "jsonPayload.event=\"batch_failed\"",
      ])
      label_extractors = {
        pipeline = "EXTRACT(jsonPayload.pipeline)"
        batch_id = "EXTRACT(jsonPayload.batch_id)"
      }
    }
  }

  # Required for a log-match condition: at most one notification per period.
  alert_strategy {
    auto_close = "1800s"

    notification_rate_limit {
      period = "300s"
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Batch $${log.extracted_label.batch_id} of pipeline $${log.extracted_label.pipeline} failed. See why with `orchestrator status $${log.extracted_label.batch_id} -p $${log.extracted_label.pipeline}`."
  }

  depends_on = [google_project_service.monitoring]
}

output "alerts_topic" {
  description = "Pub/Sub topic id that receives every alert; subscribe to it (with a filter on attributes.kind if you like) to route alerts to email, Chat or PagerDuty."
  value       = google_pubsub_topic.alerts.id
}
