"""Model sources: build a module, its labels and its exact preprocessing from torchvision, Hugging Face or timm."""
