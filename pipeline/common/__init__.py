"""Shared plumbing of every stage: parameters, atomic file output, Ray sessions, the MLflow store, the stage runner."""
