"""Model sources: the libraries models come from, behind one interface (`base.ModelSource`).

`registry` maps model.toml's `arch` to a source and is the engine's one way in; `torchvision_models`, `hf_models` and
`timm_models` are the sources; `checkpoints`, `labels`, `embedding` and `attention` are what they share.
"""
