"""The HTTP adapter: routes read a request, call the engine, and shape the response. No model code here."""
