"""Adapters for Google Cloud: BigQuery and Cloud Storage (clients imported lazily)."""
