"""Chest X-ray classification (Normal / Covid / Viral Pneumonia) with a re-headed VGG19, Lightning and Hydra."""

from omegaconf import OmegaConf

__version__ = "0.2.0"

# Used by conf/hydra/default.yaml, so registered on import: python train.py resume=RUN_DIR runs in RUN_DIR itself
# and leaves its .hydra/ folder to chestxray.resume (which writes the merged settings there).
OmegaConf.register_new_resolver(
    "chestxray.run_dir", lambda resume, default: str(resume) if resume else default, replace=True
)
OmegaConf.register_new_resolver("chestxray.hydra_subdir", lambda resume: None if resume else ".hydra", replace=True)
