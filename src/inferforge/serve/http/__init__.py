"""The HTTP face of the server: the V2 protocol and its extensions, adapted onto the engine."""
