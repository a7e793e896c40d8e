# Topics and the push subscriptions that feed route.
#
# Pub/Sub pushes the raw envelope ({"message": ..., "subscription": ...}) to
# route; functions-framework turns it into a
# google.cloud.pubsub.topic.v1.messagePublished CloudEvent. The endpoint path
# names the topic (projects/P/topics/T), which functions-framework puts into
# the CloudEvent source, so route can tell a dead letter from a task message.
# Dead-lettered messages also carry the CloudPubSubDeadLetterSource* attributes.

resource "google_pubsub_topic" "tasks" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  project = var.project_id
  name    = var.tasks_topic
  labels  = local.labels

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "batch_events" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  project = var.project_id
  name    = var.events_topic
  labels  = local.labels

  # Kept so that a consumer subscribing later can seek back over recent events.
  message_retention_duration = "86400s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  project = var.project_id
  name    = var.dead_letter_topic
  labels  = local.labels

  depends_on = [google_project_service.apis]
}

# Where a dead letter goes when route cannot even record it in the task log
# (for example while the database is down): parked for an operator.
resource "google_pubsub_topic" "dead_letter_parked" {
  # checkov:skip=CKV_GCP_83: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  project = var.project_id
  name    = "${var.dead_letter_topic}-parked"
  labels  = local.labels

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "tasks_route" {
  project = var.project_id
  name    = "${var.tasks_topic}-route"
  topic   = google_pubsub_topic.tasks.id
  labels  = local.labels

  # Longer than route's timeout, so a slow task is not redelivered while it runs.
  ack_deadline_seconds       = 600
  message_retention_duration = var.message_retention_duration

  push_config {
    push_endpoint = "${google_cloudfunctions2_function.route.service_config[0].uri}/projects/${var.project_id}/topics/${google_pubsub_topic.tasks.name}"

    oidc_token {
      service_account_email = google_service_account.push.email
      audience              = google_cloudfunctions2_function.route.service_config[0].uri
    }
  }

  retry_policy {
    minimum_backoff = var.retry_minimum_backoff
    maximum_backoff = var.retry_maximum_backoff
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }
}

# Feeds dead letters back to route, which records them in the task log.
resource "google_pubsub_subscription" "dead_letter_route" {
  project = var.project_id
  name    = "${var.dead_letter_topic}-route"
  topic   = google_pubsub_topic.dead_letter.id
  labels  = local.labels

  ack_deadline_seconds       = 60
  message_retention_duration = var.message_retention_duration

  push_config {
    push_endpoint = "${google_cloudfunctions2_function.route.service_config[0].uri}/projects/${var.project_id}/topics/${google_pubsub_topic.dead_letter.name}"

    oidc_token {
      service_account_email = google_service_account.push.email
      audience              = google_cloudfunctions2_function.route.service_config[0].uri
    }
  }

  retry_policy {
    minimum_backoff = var.retry_minimum_backoff
    maximum_backoff = var.retry_maximum_backoff
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter_parked.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }
}

# Pulled by hand: gcloud pubsub subscriptions pull <name> --auto-ack
resource "google_pubsub_subscription" "dead_letter_parked" {
  project = var.project_id
  name    = "${var.dead_letter_topic}-parked"
  topic   = google_pubsub_topic.dead_letter_parked.id
  labels  = local.labels

  ack_deadline_seconds       = 60
  message_retention_duration = var.message_retention_duration

  expiration_policy {
    ttl = ""
  }
}
