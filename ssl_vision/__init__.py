"""ssl-vision: self-supervised vision pre-training (SimCLR, MoCo v2/v3, MAE) on Lightning + timm + Kornia."""

__version__ = "0.1.0"
