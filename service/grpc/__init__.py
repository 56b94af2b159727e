"""The KServe V2 protocol over gRPC, and gRPC health: thin adapters over the same data plane as HTTP."""
