"""The use cases: one module each, every rule written once, each public use case states its invariant."""
