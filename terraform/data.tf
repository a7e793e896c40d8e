# Landing buckets (where files arrive), the access-log bucket, and the
# BigQuery datasets that the handlers load into. Both are named logically in
# the pipelines; locals in main.tf map each logical name to the real one.

resource "google_storage_bucket" "landing" {
  for_each = local.landing_buckets

  project = var.project_id
  name    = each.value
  # Regional, in the functions' region: Eventarc storage triggers need the
  # trigger and the bucket in the same location.
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection
  labels                      = local.labels

  versioning {
    enabled = true
  }

  logging {
    log_bucket = google_storage_bucket.access_logs.name
  }

  # Replaced or deleted versions are kept for a while, then deleted.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.landing_noncurrent_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  # Loaded files are rarely read again.
  lifecycle_rule {
    condition {
      age        = var.landing_archive_days
      with_state = "LIVE"
    }
    action {
      type          = "SetStorageClass"
      storage_class = "ARCHIVE"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "access_logs" {
  # checkov:skip=CKV_GCP_62: this bucket is the access-log sink of the other buckets; logging its own access would log the logs
  # checkov:skip=CKV_GCP_78: log objects are written once and expire by the lifecycle rule; versions would only keep duplicates
  project                     = var.project_id
  name                        = "${var.project_id}-${var.name_prefix}-access-logs"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection
  labels                      = local.labels

  lifecycle_rule {
    condition {
      age = var.access_log_retention_days
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

# Cloud Storage writes usage logs as this group.
resource "google_storage_bucket_iam_member" "access_log_writer" {
  bucket = google_storage_bucket.access_logs.name
  role   = "roles/storage.objectCreator"
  member = "group:cloud-storage-analytics@google.com"
}

resource "google_bigquery_dataset" "warehouse" {
  # checkov:skip=CKV_GCP_81: Google-managed encryption at rest; a customer-managed key is left out of the minimal deployment
  for_each = local.bq_datasets

  project       = var.project_id
  dataset_id    = each.value
  friendly_name = "Orchestrator ${each.key}"
  description   = "Tables the orchestrator's pipelines name ${each.key}.<table>."
  location      = local.bq_location
  labels        = local.labels

  # Access is granted per member in iam.tf; nothing is public.
  delete_contents_on_destroy = false

  lifecycle {
    precondition {
      condition     = contains(var.bq_datasets, var.bq_default_dataset)
      error_message = "bq_default_dataset must be one of bq_datasets."
    }
  }

  depends_on = [google_project_service.apis]
}
