# The deployment job: a Cloud Run job whose container runs `orchestrator deploy`
# against the private IP of Cloud SQL: migrate the schema, then store every
# pipeline of pipelines_dir. Terraform builds its image with Cloud Build (unless
# migration_image is given), executes it and waits whenever the source changed
# (pipelines included), and only then deploys the functions, so new code never
# meets an old schema or a pipeline it does not know.
#
# The image is built from source_dir as `gcloud builds submit` uploads it: what
# .gcloudignore at its root leaves in (never terraform state, variables or
# virtualenvs).

locals {
  migration_image = coalesce(
    var.migration_image,
    "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}/orchestrator:${data.archive_file.source.output_md5}"
  )
}

resource "terraform_data" "migration_image" {
  count = var.migration_image == null ? 1 : 0

  triggers_replace = [local.migration_image]

  provisioner "local-exec" {
    working_dir = abspath(local.source_dir)
    command     = <<-EOT
      gcloud builds submit . \
        --project '${var.project_id}' \
        --region '${var.region}' \
        --config terraform/migrations/cloudbuild.yaml \
        --substitutions '_IMAGE=${local.migration_image},_PIPELINES_DIR=${var.pipelines_dir}' \
        --service-account '${google_service_account.build.id}' \
        --gcs-source-staging-dir 'gs://${google_storage_bucket.source.name}/cloudbuild-staging'
    EOT
  }

  depends_on = [
    time_sleep.build_grants,
    google_project_service.apis,
  ]
}

resource "google_cloud_run_v2_job" "migrate" {
  project             = var.project_id
  name                = "${var.name_prefix}-migrate"
  location            = var.region
  labels              = local.labels
  deletion_protection = var.deletion_protection

  template {
    task_count  = 1
    parallelism = 1

    template {
      service_account = google_service_account.migrate.email
      max_retries     = 1
      timeout         = "600s"

      vpc_access {
        connector = google_vpc_access_connector.orchestrator.id
        egress    = "PRIVATE_RANGES_ONLY"
      }

      containers {
        image = local.migration_image
        args  = ["deploy"]

        resources {
          limits = {
            cpu    = "1"
            memory = "1Gi"
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
  }

  depends_on = [
    terraform_data.migration_image,
    google_secret_manager_secret_iam_member.db_password,
    google_secret_manager_secret_version.db_password,
    google_sql_database.metadata,
    google_sql_user.orchestrator,
  ]
}

resource "terraform_data" "migrate" {
  count = var.run_migrations_on_apply ? 1 : 0

  triggers_replace = [
    local.migration_image,
    data.archive_file.source.output_md5,
    google_cloud_run_v2_job.migrate.id,
  ]

  provisioner "local-exec" {
    command = "gcloud run jobs execute '${google_cloud_run_v2_job.migrate.name}' --project '${var.project_id}' --region '${var.region}' --wait"
  }
}
