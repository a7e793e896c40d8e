# Cloud SQL for PostgreSQL: the task log. Private IP only, TLS required,
# automated backups with point-in-time recovery. The password lives in Secret
# Manager and reaches the functions and the job as a secret, never as a plain
# variable.

resource "random_password" "db" {
  length  = 32
  special = false
}

resource "google_secret_manager_secret" "db_password" {
  project   = var.project_id
  secret_id = "${var.name_prefix}-db-password"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "db_password" {
  secret      = google_secret_manager_secret.db_password.id
  secret_data = random_password.db.result
}

resource "google_sql_database_instance" "metadata" {
  # checkov:skip=CKV_GCP_6: ssl_mode ENCRYPTED_ONLY refuses every unencrypted connection and the instance has only a private IP; requiring client certificates would mean issuing and rotating one per function instance
  # checkov:skip=CKV_GCP_79: the default db_version is the newest major version the google provider v6 documents for database_version (POSTGRES_17); set db_version to move on when the provider documents a newer one
  # checkov:skip=CKV2_GCP_13: log_duration logs the duration of every statement, a Cloud Logging bill at the task log's statement rate; Query Insights (enabled below) records statement latency instead
  project             = var.project_id
  name                = "${var.name_prefix}-metadata"
  region              = var.region
  database_version    = var.db_version
  deletion_protection = var.deletion_protection

  settings {
    tier                        = var.db_tier
    edition                     = "ENTERPRISE"
    availability_type           = var.db_availability_type
    disk_type                   = "PD_SSD"
    disk_size                   = var.db_disk_size_gb
    disk_autoresize             = true
    deletion_protection_enabled = var.deletion_protection
    user_labels                 = local.labels

    ip_configuration {
      ipv4_enabled                                  = false
      private_network                               = google_compute_network.orchestrator.id
      enable_private_path_for_google_cloud_services = true
      ssl_mode                                      = "ENCRYPTED_ONLY"
    }

    backup_configuration {
      enabled                        = true
      start_time                     = var.db_backup_start_time
      point_in_time_recovery_enabled = true
      transaction_log_retention_days = 7

      backup_retention_settings {
        retained_backups = var.db_backup_retained_count
        retention_unit   = "COUNT"
      }
    }

    maintenance_window {
      day          = 7
      hour         = 4
      update_track = "stable"
    }

    insights_config {
      query_insights_enabled  = true
      record_application_tags = true
      record_client_address   = false
    }

    # The connection budget is checked against this value (see the precondition).
    database_flags {
      name  = "max_connections"
      value = tostring(var.db_max_connections)
    }

    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }

    database_flags {
      name  = "log_connections"
      value = "on"
    }

    database_flags {
      name  = "log_disconnections"
      value = "on"
    }

    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }

    database_flags {
      name  = "log_min_messages"
      value = "error"
    }

    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }

    database_flags {
      name  = "log_temp_files"
      value = "0"
    }

    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }

    database_flags {
      name  = "log_hostname"
      value = "on"
    }

    database_flags {
      name  = "log_statement"
      value = "ddl"
    }

    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
  }

  lifecycle {
    precondition {
      condition     = local.connection_budget <= var.db_max_connections
      error_message = "Connection budget exceeded: the functions' max instances x (db_pool_size + db_max_overflow) + the migration job + db_reserved_connections must not exceed db_max_connections. Lower max_instances or raise db_max_connections (and db_tier)."
    }
  }

  depends_on = [google_service_networking_connection.private_services]
}

resource "google_sql_database" "metadata" {
  project  = var.project_id
  name     = var.db_name
  instance = google_sql_database_instance.metadata.name
}

resource "google_sql_user" "orchestrator" {
  project  = var.project_id
  name     = var.db_user
  instance = google_sql_database_instance.metadata.name
  password = random_password.db.result
}
