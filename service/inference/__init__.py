"""The data plane: request bytes -> answer. Admission, decode, the queue to the workers, the worker
loop and its engine, and the worker's follower of the served state."""
