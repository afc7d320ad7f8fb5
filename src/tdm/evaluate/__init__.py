"""Evaluation of students against their teachers: feature networks, scores, comparisons and reports."""
