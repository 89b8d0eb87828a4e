"""Batch jobs: classify many images without a server, in this process or on a Ray or Spark cluster."""
