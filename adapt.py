"""Adapt a trained checkpoint to a new site: python adapt.py ckpt=PATH site=FOLDER; python adapt.py --help."""

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="adapt")
def main(cfg: DictConfig) -> None:
    from chestxray.runtime.entry import run_entry_point
    from chestxray.training.adapt import adapt

    run_entry_point("adapt.py", lambda: adapt(cfg), cfg.paths.output_dir, stopped="nothing written yet is complete")


if __name__ == "__main__":
    main()
