"""The gRPC face: servicers, interceptors and conversions between protobuf and the domain."""
