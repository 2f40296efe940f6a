"""Predict with a trained checkpoint: python predict.py ckpt=PATH inputs=PATH; python predict.py --help."""

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from chestxray.inference.predict import predict
    from chestxray.runtime.console import say, shown
    from chestxray.runtime.entry import run_entry_point

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
