"""Monitoring: metrics, health, alerts."""
