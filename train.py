"""Train the chest X-ray classifier: python train.py [overrides], see README.md and conf/train.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from chestxray.training import train

    return train(cfg)


if __name__ == "__main__":
    main()
