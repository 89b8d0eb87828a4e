"""Metrics (one registry) and logs: what the engine and the HTTP layer report, and how it is written."""
