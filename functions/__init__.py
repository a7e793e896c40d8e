"""Cloud Function entry points; see `functions.main`."""
