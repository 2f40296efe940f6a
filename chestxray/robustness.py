"""python -m chestxray.robustness ckpt=PATH inputs=DATA/test [key=value ...]: accuracy under acquisition shifts at 5
severities (chestxray.evaluation.robustness), written into a run folder of its own, outputs/robustness/runs/<time>
(the same Hydra run folders as train.py and predict.py: a run never writes into another's folder)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="robustness")
def main(cfg: DictConfig) -> None:
    from chestxray.evaluation.robustness import robustness
    from chestxray.runtime.console import say, shown
    from chestxray.runtime.entry import run_entry_point

    summary = run_entry_point(
        "chestxray.robustness",
        lambda: robustness(cfg),
        cfg.paths.output_dir,
        stopped="nothing written",
    )
    if summary:
        free = summary["clean_leak_free_accuracy"]
        say(
            f"{summary['images']} image(s), clean accuracy {summary['clean_accuracy']:.3f}"
            + (f" (leak-free {free:.3f})" if free is not None else "")
            + f"; robustness.md, .csv and .png in {shown(summary['output_dir'])} ({summary['seconds']} s)"
        )


if __name__ == "__main__":
    main()
