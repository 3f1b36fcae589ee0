"""Calibration statistics: forward-hook collection, passes under a memory budget, the store."""
