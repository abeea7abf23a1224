"""English message templates: package data that delivery/messages.py reads."""
