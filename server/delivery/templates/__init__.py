"""Message templates by language (string.Template files): package data that delivery/messages.py reads."""
