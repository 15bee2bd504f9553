"""Stage 3: multi-task CTR, imbalance, throughput and latency (see README.md here)."""
