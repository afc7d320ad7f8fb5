"""Metrics and evaluation of students against their teachers."""
