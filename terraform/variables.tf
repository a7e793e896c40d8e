variable "project_id" {
  type        = string
  description = "Google Cloud project that receives every resource."
}

variable "region" {
  type        = string
  description = "Region for the functions, Cloud SQL, the buckets, the VPC connector, Cloud Scheduler and the deployment job. The landing buckets must be regional for Eventarc, so they live here too."
  default     = "europe-west1"
}

variable "name_prefix" {
  type        = string
  description = "Prefix of function, service account, bucket, job and instance names, so that two deployments can share a project."
  default     = "orch"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,10}$", var.name_prefix))
    error_message = "name_prefix must be 2-11 characters: lowercase letters, digits and hyphens, starting with a letter (service account ids are limited to 30 characters)."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels added to every resource that supports them."
  default     = {}
}

variable "enable_apis" {
  type        = bool
  description = "Enable the Google APIs that the deployment needs. Turn off when the project's APIs are managed elsewhere."
  default     = true
}

# --- Function source -------------------------------------------------------

variable "source_dir" {
  type        = string
  description = "Root of the repository whose package is deployed (it must hold requirements.txt, pyproject.toml, orchestrator/, functions/ and the pipelines_dir folder). Null means the parent folder of this module."
  default     = null
}

variable "source_excludes" {
  type        = list(string)
  description = "Paths and glob patterns (doublestar syntax, matched against paths relative to source_dir) left out of the function source archive."
  default = [
    ".git",
    ".gitignore",
    ".gcloudignore",
    ".venv*",
    ".orchestrator",
    ".tmp",
    ".hypothesis",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".ci",
    "bench",
    "scripts",
    "tests",
    "terraform",
    "dist",
    "build",
    "*.egg-info",
    "**/__pycache__",
    "**/.terraform",
    "**/*.tfstate",
    "**/*.tfstate.*",
    "**/*.tfvars",
  ]
}

variable "python_runtime" {
  type        = string
  description = "Cloud Functions runtime of every function."
  default     = "python312"
}

# --- Functions -------------------------------------------------------------

variable "functions" {
  type = map(object({
    max_instances   = number
    memory          = string
    cpu             = string
    timeout_seconds = number
  }))
  description = "Scaling and size of each function: route, on_object_finalized (per landing bucket), sweep and status. max_instances enters the connection budget (see db_max_connections)."
  default = {
    route = {
      max_instances   = 20
      memory          = "1Gi"
      cpu             = "1"
      timeout_seconds = 540
    }
    on_object_finalized = {
      max_instances   = 5
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 120
    }
    sweep = {
      max_instances   = 1
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 50
    }
    status = {
      max_instances   = 3
      memory          = "512Mi"
      cpu             = "1"
      timeout_seconds = 60
    }
  }

  validation {
    condition     = alltrue([for k in ["route", "on_object_finalized", "sweep", "status"] : contains(keys(var.functions), k)])
    error_message = "functions must have an entry for route, on_object_finalized, sweep and status."
  }

  validation {
    condition     = alltrue([for f in values(var.functions) : f.max_instances >= 1 && f.timeout_seconds >= 1 && f.timeout_seconds <= 540])
    error_message = "Every function needs max_instances >= 1 and a timeout between 1 and 540 seconds (the limit of event-driven functions)."
  }
}

variable "sweep_schedule" {
  type        = string
  description = "Cron schedule of the sweep (re-publish unclaimed QUEUED tasks, expire leases, close finished batches)."
  default     = "* * * * *"
}

variable "log_format" {
  type        = string
  description = "Value of ORCHESTRATOR_LOG_FORMAT; json makes Cloud Logging parse severity and fields."
  default     = "json"
}

variable "pipelines_dir" {
  type        = string
  description = "Value of ORCHESTRATOR_PIPELINES_DIR: the folder of pipeline YAML files (and the SQL and Python beside them), relative to source_dir. It ships in the function source and in the job's image; every apply that changes it runs `orchestrator deploy`, which stores its pipelines."
  default     = "pipelines"

  validation {
    condition     = !startswith(var.pipelines_dir, "/") && !strcontains(var.pipelines_dir, "..")
    error_message = "pipelines_dir is a path inside source_dir: relative, without '..'."
  }
}

variable "extra_environment" {
  type        = map(string)
  description = "More plain environment variables for every function and the migration job. Never put a secret here."
  default     = {}
}

# --- Pub/Sub ---------------------------------------------------------------

variable "tasks_topic" {
  type        = string
  description = "Name of the topic of start_batch and run_task messages (ORCHESTRATOR_TASKS_TOPIC)."
  default     = "tasks"
}

variable "events_topic" {
  type        = string
  description = "Name of the topic of state transitions and finished batches (ORCHESTRATOR_EVENTS_TOPIC)."
  default     = "batch-events"
}

variable "dead_letter_topic" {
  type        = string
  description = "Name of the topic that receives messages which route failed to handle max_delivery_attempts times."
  default     = "dead-letter"
}

variable "max_delivery_attempts" {
  type        = number
  description = "Deliveries of one message before Pub/Sub moves it to the dead-letter topic (5 to 100)."
  default     = 10

  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "Pub/Sub accepts 5 to 100 delivery attempts."
  }
}

variable "retry_minimum_backoff" {
  type        = string
  description = "Smallest delay before Pub/Sub redelivers a message that route did not acknowledge."
  default     = "10s"
}

variable "retry_maximum_backoff" {
  type        = string
  description = "Largest delay before Pub/Sub redelivers a message (at most 600s)."
  default     = "600s"
}

variable "message_retention_duration" {
  type        = string
  description = "How long an unacknowledged message stays in a subscription."
  default     = "604800s"
}

# --- Cloud SQL -------------------------------------------------------------

variable "db_tier" {
  type        = string
  description = "Cloud SQL machine tier. It must allow db_max_connections."
  default     = "db-custom-1-3840"
}

variable "db_version" {
  type        = string
  description = "Cloud SQL PostgreSQL major version, one the google provider documents for database_version."
  default     = "POSTGRES_17"

  validation {
    condition     = contains(["POSTGRES_14", "POSTGRES_15", "POSTGRES_16", "POSTGRES_17"], var.db_version)
    error_message = "db_version must be POSTGRES_14, POSTGRES_15, POSTGRES_16 or POSTGRES_17."
  }
}

variable "db_availability_type" {
  type        = string
  description = "ZONAL or REGIONAL (a standby in another zone)."
  default     = "ZONAL"

  validation {
    condition     = contains(["ZONAL", "REGIONAL"], var.db_availability_type)
    error_message = "db_availability_type must be ZONAL or REGIONAL."
  }
}

variable "db_disk_size_gb" {
  type        = number
  description = "Initial disk size; the disk grows on its own."
  default     = 10
}

variable "db_name" {
  type        = string
  description = "Name of the metadata database."
  default     = "orchestrator"
}

variable "db_user" {
  type        = string
  description = "Name of the database user of the functions and the migration job."
  default     = "orchestrator"
}

variable "db_max_connections" {
  type        = number
  description = "The server's max_connections flag. The plan fails unless sum(max_instances) x (db_pool_size + db_max_overflow) + the migration job + db_reserved_connections fits in it."
  default     = 100
}

variable "db_reserved_connections" {
  type        = number
  description = "Connections kept free for operators, the Cloud SQL agents and superuser_reserved_connections."
  default     = 15
}

variable "db_pool_size" {
  type        = number
  description = "ORCHESTRATOR_DB_POOL_SIZE: connections kept open per function instance."
  default     = 2
}

variable "db_max_overflow" {
  type        = number
  description = "ORCHESTRATOR_DB_MAX_OVERFLOW: extra connections a function instance may open beyond the pool."
  default     = 0
}

variable "db_backup_start_time" {
  type        = string
  description = "UTC start (HH:MM) of the daily automated backup."
  default     = "03:00"
}

variable "db_backup_retained_count" {
  type        = number
  description = "Automated backups kept."
  default     = 14
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the Cloud SQL instance, the migration job and non-empty buckets from terraform destroy."
  default     = true
}

# --- Network ---------------------------------------------------------------

variable "connector_cidr" {
  type        = string
  description = "Unused /28 range of the Serverless VPC Access connector's subnet."
  default     = "10.8.0.0/28"
}

variable "private_service_prefix_length" {
  type        = number
  description = "Prefix length of the range reserved for Cloud SQL's private IP (private services access)."
  default     = 20
}

# --- Data ------------------------------------------------------------------

variable "landing_buckets" {
  type        = list(string)
  description = "Short names of the landing buckets. Each becomes bucket <project_id>-<name_prefix>-<name> with its own on_object_finalized trigger."
  default     = ["landing"]

  validation {
    condition     = length(var.landing_buckets) >= 1 && alltrue([for b in var.landing_buckets : can(regex("^[a-z0-9][a-z0-9-]{0,20}$", b))])
    error_message = "Give at least one landing bucket; names are lowercase letters, digits and hyphens, at most 21 characters."
  }
}

variable "landing_noncurrent_days" {
  type        = number
  description = "Days a replaced or deleted landing object version is kept before it is deleted."
  default     = 30
}

variable "landing_archive_days" {
  type        = number
  description = "Age in days after which landing objects move to the ARCHIVE storage class."
  default     = 90
}

variable "bq_datasets" {
  type        = list(string)
  description = "Logical names of the BigQuery datasets the pipelines use (analytics in analytics.sales). Each becomes dataset <name_prefix>_<name> (hyphens as underscores); ORCHESTRATOR_DATASETS maps one to the other."
  default     = ["analytics"]

  validation {
    condition     = length(var.bq_datasets) >= 1 && alltrue([for d in var.bq_datasets : can(regex("^[A-Za-z_][A-Za-z0-9_]{0,900}$", d))])
    error_message = "Give at least one dataset; names are letters, digits and underscores, not starting with a digit."
  }
}

variable "bq_default_dataset" {
  type        = string
  description = "Logical dataset of table names without one (sales in a query's FROM); one of bq_datasets (ORCHESTRATOR_BQ_DATASET)."
  default     = "analytics"
}

variable "bq_location" {
  type        = string
  description = "Location of the BigQuery datasets and their jobs (ORCHESTRATOR_BQ_LOCATION). Null means the region."
  default     = null
}

variable "access_log_retention_days" {
  type        = number
  description = "Days the buckets' access logs are kept."
  default     = 90
}

# --- Migrations ------------------------------------------------------------

variable "migration_image" {
  type        = string
  description = "Container image of the deployment job: the package installed, `orchestrator` as entrypoint, the pipelines_dir folder in its working directory. Null builds one from terraform/migrations/Dockerfile with Cloud Build during apply (needs gcloud where Terraform runs)."
  default     = null
}

variable "run_migrations_on_apply" {
  type        = bool
  description = "Execute the deployment job (`orchestrator deploy`: migrate the database, store the pipelines) and wait for it whenever the source or the image changes. Needs gcloud where Terraform runs."
  default     = true
}

variable "status_invokers" {
  type        = list(string)
  description = "IAM members (user:, group:, serviceAccount:) allowed to call the status function. It always requires authentication."
  default     = []

  validation {
    condition     = alltrue([for m in var.status_invokers : !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "status requires authentication: allUsers and allAuthenticatedUsers are refused."
  }
}
