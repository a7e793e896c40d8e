"""Implementations of the ports: `gcp` (Google Cloud) and `local` (the embedded runtime).

Nothing here imports a Google client at import time; each adapter does so when
first used.
"""
