"""The HTTP adapter: the app factory, middleware, error mapping, and the v1, OIP and demo routes."""
