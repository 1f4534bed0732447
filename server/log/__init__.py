"""The candidate log: every candidate and every piece of feedback, durably in SQLite, and its export."""
