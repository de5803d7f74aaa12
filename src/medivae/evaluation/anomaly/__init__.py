"""Anomaly detection with a model fitted on normal images only (An & Cho 2015; Baur et al. 2021)."""
