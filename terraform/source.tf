# The function source: a zip of the repository (the package, requirements.txt
# and the pipelines folder, without what source_excludes names), uploaded under a
# name that carries its hash so that every change redeploys the functions and
# reruns the deployment job. `make function-source` builds the same zip locally.

data "archive_file" "source" {
  type        = "zip"
  source_dir  = local.source_dir
  excludes    = var.source_excludes
  output_path = "${path.module}/.build/function-source.zip"
}

resource "google_storage_bucket" "source" {
  # checkov:skip=CKV_GCP_78: objects are immutable and content-addressed (the name carries the archive hash), so versioning would only keep duplicates
  project                     = var.project_id
  name                        = "${var.project_id}-${var.name_prefix}-source"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection
  labels                      = local.labels

  logging {
    log_bucket = google_storage_bucket.access_logs.name
  }

  lifecycle_rule {
    condition {
      age = 90
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket_object" "source" {
  name   = "function-source/${data.archive_file.source.output_md5}.zip"
  bucket = google_storage_bucket.source.name
  source = data.archive_file.source.output_path

  lifecycle {
    precondition {
      condition     = fileexists("${local.source_dir}/requirements.txt")
      error_message = "The function source needs requirements.txt at its root (the repository's names \".\", the package itself); source_dir must be the repository root."
    }
  }
}

resource "google_artifact_registry_repository" "images" {
  # checkov:skip=CKV_GCP_84: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  project       = var.project_id
  location      = var.region
  repository_id = "${var.name_prefix}-images"
  description   = "Function builds and the migration image of the orchestrator."
  format        = "DOCKER"
  labels        = local.labels

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }

  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.apis]
}
