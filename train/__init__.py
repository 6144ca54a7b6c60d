"""``python -m train``: Hydra entry point (``__main__.py``) around :func:`train.run.run`."""
