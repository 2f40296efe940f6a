"""Predict with a trained checkpoint: python predict.py ckpt=PATH inputs=PATH, see README.md."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from chestxray.inference import PredictError, predict

    try:
        summary = predict(cfg)
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
