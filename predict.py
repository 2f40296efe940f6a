"""Predict with a trained checkpoint: python predict.py ckpt=PATH inputs=PATH; python predict.py --help."""

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from chestxray.console import run_entry_point, say, shown
    from chestxray.inference import predict

    summary = run_entry_point(
        "predict.py", lambda: predict(cfg), cfg.paths.output_dir, stopped=f"the finished rows are in {cfg.output_dir}"
    )
    if summary:
        say(
            f"predicted {summary['predicted']} image(s), {summary['errors']} unreadable; "
            f"outputs in {shown(summary['output_dir'])}"
        )


if __name__ == "__main__":
    main()
