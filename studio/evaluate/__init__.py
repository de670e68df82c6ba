"""Evaluation: before/after answers side by side, a retrieval baseline, and a scored report."""
