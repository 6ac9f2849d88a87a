"""Ranking and reporting: per-type ranking, the selection strategies and their bootstrap, the
versioned Report, and every view of it (tables, figures, HTML, diffs, precision comparisons)."""
