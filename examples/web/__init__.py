"""A reference login site on the twofactor SDK: password, then the second factor.

Run it with `make web` (or `python -m examples.web`) beside `make serve`; see README.md.
"""
