"""Evaluation: pure metric functions -> results.json -> report. No metric here downloads weights."""
