"""Train the chest X-ray classifier: python train.py [overrides]; python train.py --help."""

import sys

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers (a new folder per run; resume=RUN_DIR runs in RUN_DIR)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from pathlib import Path

    from chestxray.runtime.entry import run_entry_point
    from chestxray.training.fit import train

    resumed = bool(cfg.get("resume")) and Path(cfg.resume).resolve() == Path(cfg.paths.output_dir).resolve()
    return run_entry_point(
        "train.py",
        lambda: train(cfg),
        cfg.paths.output_dir,
        stopped=f"resume with: python train.py resume={cfg.paths.output_dir}",
        fresh_folder=not resumed,
    )


def refuse_password_argument() -> None:
    """A URI with a password never reaches Hydra, which would write it into the run's .hydra files."""
    from chestxray.runtime.secrets import PASSWORD_ON_COMMAND_LINE, password_argument

    key = password_argument(sys.argv[1:])
    if key:
        print(f"train.py: error: ConfigError: {PASSWORD_ON_COMMAND_LINE.format(key=key)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    refuse_password_argument()
    main()
