"""HTTP: routes as thin adapters over the data plane, the admin API, side listeners, and the one
table that maps error types to status codes."""
