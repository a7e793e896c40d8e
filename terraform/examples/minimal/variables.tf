variable "project_id" {
  type        = string
  description = "Project to deploy the example into."
}

variable "region" {
  type        = string
  description = "Region of the deployment."
  default     = "europe-west1"
}

variable "status_invokers" {
  type        = list(string)
  description = "Members allowed to call the status function, e.g. [\"user:you@example.com\"]."
  default     = []
}
