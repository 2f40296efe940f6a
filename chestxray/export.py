"""python -m chestxray.export ckpt=PATH [format=onnx|onnx-int8] [out=FILE]: export trained checkpoints to one ONNX
graph (chestxray.inference.onnx), cached in the cache folder where predict.py runtime=onnx finds it."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from chestxray.errors import UserError
from chestxray.inference.onnx import exported
from chestxray.runtime.files import atomic_copy, probe_writable

USAGE = """usage: python -m chestxray.export ckpt=PATH|[A.ckpt,B.ckpt] [format=onnx|onnx-int8] [calibration=FOLDER]
                                  [out=FILE]

Export trained checkpoints (several: their averaged probabilities) to one ONNX graph: uint8 images N x 3 x S x S in,
class probabilities out, with the normalisation and the fitted temperature inside. The file is cached in the cache
folder ($CHESTXRAY_CACHE/onnx, what predict.py runtime=onnx loads); out= copies it where you want it.

  ckpt=         a .ckpt written by train.py, or a list of them
  format=       onnx (fp32, default) or onnx-int8 (static int8, calibrated once, here)
  calibration=  onnx-int8's calibration images: a folder, or train (the checkpoint's own train images, the
                default for a new export)
  out=          also write the graph to this file

example: python -m chestxray.export ckpt=outputs/train/runs/<run>/checkpoints/best.ckpt out=model.onnx
Needs the onnx extra: pip install 'chestxray[onnx]'."""


def main(argv: list[str] | None = None) -> int:
    """python -m chestxray.export ckpt=PATH|[A,B] [format=onnx|onnx-int8] [calibration=FOLDER] [out=FILE]"""
    from chestxray.inference.predict import calibration_images
    from chestxray.models.checkpoints import load_models

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return 0
    cfg = OmegaConf.from_cli(argv)
    if "ckpt" not in cfg:
        print(f"export: error: ckpt= is required\n\n{USAGE}", file=sys.stderr)
        return 2
    fmt = cfg.get("format", "onnx")
    try:
        ckpt = cfg.ckpt
        paths = [str(p) for p in ckpt] if OmegaConf.is_list(ckpt) else [str(ckpt)]
        models = load_models(paths)
        calibration = calibration_images(cfg.get("calibration"), models[0].classes)
        if cfg.get("out"):
            _check_out(Path(str(cfg.out)))
        path = exported(paths, models, fmt, calibration)
        if cfg.get("out"):
            try:
                path = atomic_copy(path, cfg.out)
            except OSError as err:
                raise UserError(
                    f"out={cfg.out}: cannot write it ({err.strerror or err}); the export is {path}"
                ) from None
    except (UserError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"{fmt}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _check_out(out: Path) -> None:
    """out= names a file this user can write, checked before the export (minutes), in one line if not."""
    if out.is_dir():
        raise UserError(f"out={out}: is a folder (name the file to write, e.g. out={out / 'model.onnx'})")
    try:
        probe_writable(out.parent)
    except OSError as err:
        raise UserError(f"out={out}: cannot write in {out.parent}: {err.strerror or err}") from None


if __name__ == "__main__":
    sys.exit(main())
