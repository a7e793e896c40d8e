# The smallest deployment: one landing bucket, one dataset, default sizes,
# deletion protection off so that `terraform destroy` cleans up a trial project.
# It deploys the repository's examples/ folder as its pipelines, so the example
# month runs as soon as its files land (see the README, "On Google Cloud").

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

  # Logical names, as examples/monthly_profit.yaml writes them: gs://landing/…
  # and analytics.<table>.
  landing_buckets = ["landing"]
  bq_datasets     = ["analytics"]
  pipelines_dir   = "examples"

  status_invokers     = var.status_invokers
  deletion_protection = false

  labels = {
    env = "example"
  }
}
