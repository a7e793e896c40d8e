"""Adapters for the embedded runtime: a DuckDB warehouse and a folder of buckets."""
