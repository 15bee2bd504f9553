"""Stage 1: UCI Adult, a shared-bottom multi-task MLP (see README.md here)."""
