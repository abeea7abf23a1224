"""Second-factor rules: codes, secrets, lockout and the use cases built on them."""
