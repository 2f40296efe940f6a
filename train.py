"""Train the chest X-ray classifier: python train.py [overrides], see README.md and conf/train.yaml."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from chestxray.training import train, user_errors

    try:
        return train(cfg)
    except user_errors() as err:
        print(f"train.py: error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
