"""The twofactor gRPC server: the API face (api/), the domain (domain/) and storage (storage/)."""
