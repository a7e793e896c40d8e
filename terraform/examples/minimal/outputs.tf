output "status_url" {
  description = "URL of the status function."
  value       = module.orchestrator.status_url
}

output "tasks_topic" {
  description = "Topic to publish start_batch messages to."
  value       = module.orchestrator.topics.tasks
}

output "landing_buckets" {
  description = "Buckets whose new files start load tasks."
  value       = module.orchestrator.landing_buckets
}

output "connection_budget" {
  description = "Worst-case database connections against max_connections."
  value       = module.orchestrator.connection_budget
}
