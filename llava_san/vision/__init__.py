"""Vision PEFT: SSF, SAN-SSF and MoPPA on timm ViTs and LLaVA's CLIP tower, and image classification.

- :mod:`.ssf` (+ :mod:`.ssf_sites`): SSF and SAN-SSF -- the maths, where the sites sit on a timm ViT
  and a CLIP tower, merging into plain weights, save/load of the trained vectors;
- :mod:`.moppa` (+ :mod:`.dct`): MoPPA, a reconstruction (heat / wave / Poisson priors in the DCT
  domain mixed by a router); every inferred choice is a :class:`~.moppa.MoppaConfig` switch;
- :mod:`.data`, :mod:`.datamodule`: VTAB-1k folders, scikit-learn's digits, easy-vqa shapes/colours;
- :mod:`.backbone`: timm classifiers (a named architecture with local weights, or a tiny random ViT);
- :mod:`.module`: the Lightning module that ``python -m train experiment=vision_digits`` (or
  ``vit_b16_vtab_san_ssf``) trains; the recipes are :mod:`llava_san.peft.recipes.vision`.
"""
