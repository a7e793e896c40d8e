# The smallest deployment: one landing bucket, default sizes, deletion
# protection off so that `terraform destroy` cleans up a trial project.

provider "google" {
  project = var.project_id
  region  = var.region
}

module "orchestrator" {
  source = "../.."

  project_id  = var.project_id
  region      = var.region
  name_prefix = "orch"

  # The repository root, two levels up from this example.
  source_dir = "${path.module}/../../.."

  landing_buckets     = ["landing"]
  bq_dataset          = "orchestrator_minimal"
  status_invokers     = var.status_invokers
  deletion_protection = false

  labels = {
    env = "example"
  }
}
