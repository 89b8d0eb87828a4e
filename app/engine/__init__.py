"""The engine as a library: the batcher, one served model's paths, and the `Engine` facade; no HTTP here."""
