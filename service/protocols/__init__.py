"""Wire formats only: /predict and KServe V2 bodies in, answers out. No I/O, no state, no inference."""
