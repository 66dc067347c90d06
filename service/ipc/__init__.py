"""The link between the engine process and the frontend processes: frames, tensor codec,
shared-memory arenas."""
