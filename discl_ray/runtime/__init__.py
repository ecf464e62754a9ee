"""Shared by every stage: Ray, storage, leases, io, logs, tracking."""
