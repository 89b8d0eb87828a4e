"""Per-image stages as pure functions: decode, preprocess (CPU or GPU), postprocess (top-k), overlays."""
