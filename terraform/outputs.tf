output "function_uris" {
  description = "HTTPS endpoint of each function (on_object_finalized keyed by landing bucket)."
  value = {
    route               = google_cloudfunctions2_function.route.service_config[0].uri
    sweep               = google_cloudfunctions2_function.sweep.service_config[0].uri
    status              = google_cloudfunctions2_function.status.service_config[0].uri
    on_object_finalized = { for k, f in google_cloudfunctions2_function.on_object_finalized : k => f.service_config[0].uri }
  }
}

output "status_url" {
  description = "URL of the status function; call it with an identity token: curl -H \"Authorization: Bearer $(gcloud auth print-identity-token)\" \"<url>?batch_id=...&pipeline=...\"."
  value       = google_cloudfunctions2_function.status.service_config[0].uri
}

output "topics" {
  description = "Pub/Sub topic ids: tasks (publish start_batch here), batch-events, dead-letter and dead-letter-parked."
  value = {
    tasks              = google_pubsub_topic.tasks.id
    batch_events       = google_pubsub_topic.batch_events.id
    dead_letter        = google_pubsub_topic.dead_letter.id
    dead_letter_parked = google_pubsub_topic.dead_letter_parked.id
  }
}

output "subscriptions" {
  description = "Pub/Sub subscription ids."
  value = {
    tasks_route        = google_pubsub_subscription.tasks_route.id
    dead_letter_route  = google_pubsub_subscription.dead_letter_route.id
    dead_letter_parked = google_pubsub_subscription.dead_letter_parked.id
  }
}

output "landing_buckets" {
  description = "Landing bucket names, keyed by their short name. A file finalized here triggers on_object_finalized."
  value       = { for k, b in google_storage_bucket.landing : k => b.name }
}

output "source_bucket" {
  description = "Bucket holding the function source archives."
  value       = google_storage_bucket.source.name
}

output "bigquery_datasets" {
  description = "BigQuery dataset ids, keyed by the logical name the pipelines use (analytics in analytics.sales)."
  value       = { for k, d in google_bigquery_dataset.warehouse : k => d.dataset_id }
}

output "sql_instance_connection_name" {
  description = "Cloud SQL connection name (PROJECT:REGION:INSTANCE), for the Cloud SQL Auth Proxy."
  value       = google_sql_database_instance.metadata.connection_name
}

output "sql_private_ip" {
  description = "Private IP address of the Cloud SQL instance."
  value       = google_sql_database_instance.metadata.private_ip_address
}

output "database_url" {
  description = "DATABASE_URL given to the functions (without password; the password is the secret db_password_secret)."
  value       = local.function_environment["DATABASE_URL"]
}

output "db_password_secret" {
  description = "Secret Manager secret id that holds the database password."
  value       = google_secret_manager_secret.db_password.id
}

output "migration_job" {
  description = "Name of the Cloud Run job that runs `orchestrator deploy` (migrate the database, store the pipelines of pipelines_dir)."
  value       = google_cloud_run_v2_job.migrate.name
}

output "migration_image" {
  description = "Container image of the deployment job."
  value       = local.migration_image
}

output "service_accounts" {
  description = "Email of every service account created, keyed by role."
  value = merge(
    { for k, sa in google_service_account.functions : k => sa.email },
    {
      push      = google_service_account.push.email
      eventarc  = google_service_account.eventarc.email
      scheduler = google_service_account.scheduler.email
      migrate   = google_service_account.migrate.email
      build     = google_service_account.build.email
    },
  )
}

output "connection_budget" {
  description = "Worst-case database connections (functions' max instances x (pool size + max overflow) + the deployment job + reserved) against max_connections."
  value = {
    function_instances       = local.function_instances
    connections_per_instance = local.connections_per_instance
    worst_case               = local.connection_budget
    max_connections          = var.db_max_connections
  }
}
