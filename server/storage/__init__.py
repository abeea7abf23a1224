"""Persistence: one SQL store over two backends, PostgreSQL and the embedded SQLite default."""
