"""Evaluation: fusion metrics (maths only), scoring, the evaluate stage and its report, promotion in the MLflow registry."""
