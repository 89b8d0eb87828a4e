"""Running the service: the uvicorn server, the workers' supervisor, and the `vit-serve` command."""
