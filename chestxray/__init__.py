"""Chest X-ray classification (Normal / Covid / Viral Pneumonia) with a re-headed VGG19, Lightning and Hydra."""

__version__ = "0.1.0"
