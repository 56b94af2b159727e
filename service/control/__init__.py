"""What is served: the shared serving state, the swap controller, canary routing and guard, the
rollout spec and its watcher, the checkpoint store and the audit log."""
