"""Human-readable QC reports."""
