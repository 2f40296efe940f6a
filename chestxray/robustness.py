"""python -m chestxray.robustness ckpt=PATH inputs=DATA/test [key=value ...]: accuracy under acquisition shifts at 5
severities (the shifts themselves: chestxray.evaluation.robustness), written into a run folder of its own,
outputs/robustness/runs/<time> (the same Hydra run folders as train.py and predict.py: a run never writes into
another's folder)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import chestxray  # noqa: F401 - registers the config resolvers

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="robustness")
def main(cfg: DictConfig) -> None:
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


def robustness(cfg) -> dict:
    """The bench's job (python -m chestxray.robustness): its files in the run folder, and a summary."""
    import json
    import time

    import torch
    from omegaconf import ListConfig, OmegaConf

    from chestxray import settings
    from chestxray.data.images import ImageLimits
    from chestxray.data.sources import find_inputs
    from chestxray.errors import PredictError
    from chestxray.evaluation.figures import render
    from chestxray.evaluation.robustness import (
        chosen_shifts,
        leak_mask_of_runs,
        machine,
        markdown_table,
        run_bench,
        severity_figure,
        table_rows,
        write_csv,
        write_tensorboard,
    )
    from chestxray.models.checkpoints import load_models, preprocess_of, training_data
    from chestxray.models.classifier import Ensemble
    from chestxray.runtime.files import atomic_write

    for key, what in (("ckpt", "a checkpoint written by train.py"), ("inputs", "labelled images, e.g. DATA/test")):
        if OmegaConf.is_missing(cfg, key):
            raise PredictError(f"{key}= is required: {what}")
    settings.check(cfg, settings.ROBUSTNESS_RULES)
    shifts = chosen_shifts(OmegaConf.to_container(cfg.shifts) if OmegaConf.is_config(cfg.shifts) else cfg.shifts)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PredictError("device=cuda: no CUDA device here (device=cpu or auto)")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    ckpts = [str(c) for c in cfg.ckpt] if isinstance(cfg.ckpt, ListConfig) else [str(cfg.ckpt)]
    models = load_models(ckpts)
    classes, image_size = models[0].classes, int(models[0].hparams.image_size)
    inputs = [str(i) for i in cfg.inputs] if isinstance(cfg.inputs, ListConfig) else [str(cfg.inputs)]
    items = [(i.path, i.label) for i in find_inputs(inputs, classes) if i.label is not None]
    if not items:
        raise PredictError(f"inputs={cfg.inputs}: no image in a folder named like a class ({', '.join(classes)})")
    limits = ImageLimits(cfg.max_pixels, cfg.min_image_side, preprocess_of(models[0]), prefix="")
    predictor = Ensemble(models).to(device).eval()
    with_flags = all(bool(m.ood.fitted) for m in models)  # checkpoints written before the detectors: no column
    work_side = None if cfg.work_side is None else max(int(cfg.work_side), image_size)
    result = run_bench(predictor, with_flags, items, image_size, shifts, limits, device, cfg.batch_size, work_side)
    if not len(result.paths):
        raise PredictError(f"none of the {len(items)} labelled input image(s) could be read (see the warnings above)")
    leak_note = "n/a (leak_free=false)"
    if cfg.leak_free:
        result.leaking, leak_note = leak_mask_of_runs([training_data(c) for c in ckpts], result.paths, limits)
    ood_note = (
        "the share the checkpoint's detector flags (model.ood.detector at the threshold fitted into the checkpoint: on "
        "its run's validation split, or on the site images for adapt.py's adapted.ckpt)"
        if result.flagged is not None
        else "not given: the checkpoint carries no out-of-distribution detector"
    )
    rows = table_rows(result)
    out = Path(cfg.paths.output_dir)
    write_csv(rows, out / "robustness.csv")
    where = machine()
    title = f"{Path(ckpts[0]).name}: {len(result.paths)} images of {cfg.inputs} at {image_size} px"
    header = [f"# Robustness: {title}", "", f"Machine: {where}; device {device.type}."]
    resolution = "full resolution" if work_side is None else f"a short side of at most {work_side} px"
    header += [f"Checkpoint's data.preprocess: {limits.preprocess}. Shifts applied at {resolution}.", ""]
    atomic_write(out / "robustness.md", "\n".join(header) + "\n" + markdown_table(rows, shifts, leak_note, ood_note))
    figure = render(severity_figure(rows, shifts, title), out / "robustness.png")
    write_tensorboard(out / "tensorboard", rows, figure)
    clean = rows[0]
    summary = {
        "ckpt": ckpts,
        "inputs": inputs,
        "images": len(result.paths),
        "unreadable": result.unreadable,
        "clean_accuracy": clean["accuracy"],
        "clean_leak_free_accuracy": clean["leak_free_accuracy"],
        "leak_free": leak_note,
        "out_of_distribution": ood_note,
        "machine": where,
        "device": device.type,
        "preprocess": limits.preprocess,
        "work_side": work_side,
        "seconds": round(time.perf_counter() - start, 1),
        "output_dir": str(out),
    }
    atomic_write(out / "results.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
