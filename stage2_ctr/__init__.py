"""Stage 2: CTR prediction on Criteo-format data (see README.md here)."""
