"""Delivery of emailed and texted codes: one attempt, providers, templates, the hand-off to workers."""
