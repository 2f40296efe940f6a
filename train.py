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


def refuse_credential_argument() -> None:
    """A URI with a credential never reaches Hydra, which would write it into the run's .hydra files."""
    from chestxray.runtime.secrets import CREDENTIAL_ON_COMMAND_LINE, credential_argument

    key = credential_argument(sys.argv[1:])
    if key:
        message = CREDENTIAL_ON_COMMAND_LINE.format(key=key)
        print(f"train.py: error: ConfigError: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    refuse_credential_argument()
    main()
