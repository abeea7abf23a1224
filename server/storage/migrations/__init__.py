"""The schema migrations, numbered SQL files: package data that storage/migrator.py reads, never imports."""
