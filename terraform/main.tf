# Root module: the whole orchestrator on Google Cloud.
#
# One file per concern:
#   main.tf        locals, project APIs, network (private IP for Cloud SQL)
#   source.tf      function source archive, Artifact Registry, build identity
#   pubsub.tf      topics, push subscriptions to route, dead lettering
#   functions.tf   route, on_object_finalized, sweep, status; Cloud Scheduler
#   database.tf    Cloud SQL for PostgreSQL, the password in Secret Manager
#   migrations.tf  Cloud Run job running `orchestrator db upgrade` on deploy
#   data.tf        landing buckets, access-log bucket, BigQuery dataset
#   iam.tf         one service account per role and its narrow grants
#   alerts.tf      the alerts topic, the webhook secret, the failed-batch alert policy
#   ui.tf          the optional web UI (Cloud Run, IAM-authenticated)

# Read during apply, once the Cloud Resource Manager API it needs is enabled.
data "google_project" "this" {
  project_id = var.project_id

  depends_on = [google_project_service.apis]
}

locals {
  source_dir  = coalesce(var.source_dir, "${path.module}/..")
  bq_location = coalesce(var.bq_location, var.region)

  labels = merge(var.labels, {
    app        = "orchestrator"
    deployment = var.name_prefix
  })

  # The entry points exported by functions/main.py.
  entry_points = {
    route               = "route"
    on_object_finalized = "on_object_finalized"
    sweep               = "sweep"
    status              = "status"
  }

  # Pipelines name buckets and datasets logically (gs://landing/…, analytics.sales);
  # the functions and the job get these maps as ORCHESTRATOR_BUCKETS and
  # ORCHESTRATOR_DATASETS.
  landing_buckets = { for b in var.landing_buckets : b => "${var.project_id}-${var.name_prefix}-${b}" }
  bq_datasets     = { for d in var.bq_datasets : d => "${replace(var.name_prefix, "-", "_")}_${d}" }

  # Connection budget: every function instance holds at most
  # pool_size + max_overflow connections (one request at a time per instance),
  # on_object_finalized is deployed once per landing bucket, and the deployment
  # job runs one task whose `orchestrator deploy` opens one engine of the same
  # pool settings.
  connections_per_instance = var.db_pool_size + var.db_max_overflow
  function_instances = (
    var.functions["route"].max_instances
    + var.functions["on_object_finalized"].max_instances * length(var.landing_buckets)
    + var.functions["sweep"].max_instances
    + var.functions["status"].max_instances
  )
  connection_budget = local.function_instances * local.connections_per_instance + local.connections_per_instance + local.ui_connections + var.db_reserved_connections

  pubsub_service_agent = "service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # Where Cloud Functions copies the source archive before building it.
  function_sources_bucket = "gcf-v2-sources-${data.google_project.this.number}-${var.region}"

  # cloudresourcemanager: data.google_project and every project-level IAM grant.
  apis = [
    "artifactregistry.googleapis.com",
    "bigquery.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "cloudscheduler.googleapis.com",
    "compute.googleapis.com",
    "eventarc.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
    "storage.googleapis.com",
    "vpcaccess.googleapis.com",
  ]
}

resource "google_project_service" "apis" {
  for_each = var.enable_apis ? toset(local.apis) : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

# --- Network: Cloud SQL has no public IP; the functions and the migration job
# reach its private IP through a Serverless VPC Access connector. -----------

resource "google_compute_network" "orchestrator" {
  project                 = var.project_id
  name                    = "${var.name_prefix}-network"
  auto_create_subnetworks = false

  depends_on = [google_project_service.apis]
}

resource "google_compute_subnetwork" "connector" {
  project                  = var.project_id
  name                     = "${var.name_prefix}-connector"
  region                   = var.region
  network                  = google_compute_network.orchestrator.id
  ip_cidr_range            = var.connector_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_global_address" "private_services" {
  project       = var.project_id
  name          = "${var.name_prefix}-private-services"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = var.private_service_prefix_length
  network       = google_compute_network.orchestrator.id
}

resource "google_service_networking_connection" "private_services" {
  network                 = google_compute_network.orchestrator.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.private_services.name]

  # Service Networking refuses to delete the peering while Cloud SQL's side still
  # uses it, which lasts days after the instance is deleted: terraform destroy
  # abandons it instead of failing.
  deletion_policy = "ABANDON"
}

resource "google_vpc_access_connector" "orchestrator" {
  project       = var.project_id
  name          = "${var.name_prefix}-connector"
  region        = var.region
  machine_type  = "e2-micro"
  min_instances = 2
  max_instances = 3

  subnet {
    name = google_compute_subnetwork.connector.name
  }
}

# Nothing in this network accepts connections from outside: deny all ingress
# below every other rule (the VPC connector adds its own narrow rules).
resource "google_compute_firewall" "deny_all_ingress" {
  project   = var.project_id
  name      = "${var.name_prefix}-deny-all-ingress"
  network   = google_compute_network.orchestrator.id
  direction = "INGRESS"
  priority  = 65534

  source_ranges = ["0.0.0.0/0"]

  deny {
    protocol = "all"
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}
