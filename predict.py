"""Predict with a trained checkpoint: python predict.py ckpt=PATH inputs=PATH, see README.md."""

import sys

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from chestxray.inference import PredictError, predict
    from chestxray.interrupt import run_until_signal

    try:
        summary = run_until_signal("predict.py", lambda: predict(cfg), f"the finished rows are in {cfg.output_dir}")
    except PredictError as err:
        print(f"predict.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    if summary:
        print(
            f"predicted {summary['predicted']} image(s), {summary['errors']} unreadable; "
            f"outputs in {summary['output_dir']}"
        )


if __name__ == "__main__":
    main()
