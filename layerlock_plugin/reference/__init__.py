"""The reference 4DS-style video ViT MAE, its embedded data, trainer, probes and CLI."""
