"""Reliability tests: faults, concurrency and load against real services (issue 9)."""
