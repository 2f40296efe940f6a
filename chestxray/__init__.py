"""Chest X-ray classification (Normal / Covid / Viral Pneumonia): torchvision backbones under a small head,
Lightning and Hydra."""

from omegaconf import OmegaConf

__version__ = "0.3.0"


def _run_dir(resume, base):
    from chestxray.runs import run_dir

    return run_dir(resume, base)


def _new_folder(base):
    from chestxray.runs import new_folder

    return new_folder(base)


def _mlflow_artifacts(tracking_uri):
    """A local MLflow store keeps its artifacts in outputs/mlartifacts; a tracking server decides for itself."""
    return None if str(tracking_uri).startswith(("http://", "https://", "databricks")) else "outputs/mlartifacts"


# Used by the configs, so registered on import. The run folders are created when Hydra resolves them (cached, so
# once per run): python train.py resume=RUN_DIR runs in RUN_DIR itself and leaves its .hydra/ folder to
# chestxray.resume (which writes the merged settings there).
OmegaConf.register_new_resolver("chestxray.run_dir", _run_dir, replace=True, use_cache=True)
OmegaConf.register_new_resolver("chestxray.new_folder", _new_folder, replace=True, use_cache=True)
OmegaConf.register_new_resolver("chestxray.hydra_subdir", lambda resume: None if resume else ".hydra", replace=True)
OmegaConf.register_new_resolver("chestxray.mlflow_artifacts", _mlflow_artifacts, replace=True)
