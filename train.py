"""Train the chest X-ray classifier: python train.py [overrides], see README.md and conf/train.yaml."""

import sys

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers (resume=RUN_DIR runs in RUN_DIR)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from chestxray.interrupt import run_until_signal
    from chestxray.training import train, user_errors

    stopped = f"resume with: python train.py resume={cfg.paths.output_dir}"
    try:
        return run_until_signal("train.py", lambda: train(cfg), stopped)
    except user_errors() as err:
        print(f"train.py: error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
