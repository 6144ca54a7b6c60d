"""Tiny random vision backbones (no download): a timm ViT and a transformers CLIP vision tower.

Shapes: patch 8 on 32 × 32 images gives a 4 × 4 grid plus one CLS token (17
tokens); CLIP has 3 layers so that LLaVA's "last layer unused" rule has one to skip.
"""
import pytest
import torch


@pytest.fixture
def tiny_vit():
    """A factory: ``tiny_vit(seed=0, **overrides)`` -> a random timm ``VisionTransformer`` in eval mode."""
    import timm.models.vision_transformer as vt

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        kwargs.update(overrides)
        return vt.VisionTransformer(**kwargs).eval()

    return make


@pytest.fixture
def tiny_clip():
    """A factory: ``tiny_clip(seed=0, **overrides)`` -> a random transformers ``CLIPVisionModel`` in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                      image_size=32, patch_size=8)
        kwargs.update(overrides)
        return CLIPVisionModel(CLIPVisionConfig(**kwargs)).eval()

    return make
