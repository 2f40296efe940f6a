"""The robustness bench: severity 0 is the shifted path at a null shift, each severity changes the image more; the
command writes its table, figure and TensorBoard events into a run folder of its own, with leak-free accuracy when
the checkpoint names its train images (the data settings saved in it) and n/a when it does not."""

import csv
import shutil

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from chestxray.errors import ConfigError
from chestxray.evaluation.robustness import SEVERITIES, SHIFTS, chosen_shifts, shifted_views
from chestxray.robustness import robustness
from tests.conftest import compose_config, run_copy, run_script

SIZE = 64


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    """A radiograph-like RGB image larger than the model's input: a grey gradient, two dark lungs, a bright spine."""
    h, w = 300, 260
    grey = np.tile(np.linspace(40, 200, w, dtype=np.float32), (h, 1))
    grey += np.linspace(-20, 20, h, dtype=np.float32)[:, None]
    image = np.clip(grey, 0, 255).astype(np.uint8)
    cv2.ellipse(image, (80, 150), (45, 90), 0, 0, 360, 30, -1)
    cv2.ellipse(image, (180, 150), (45, 90), 0, 0, 360, 35, -1)
    cv2.rectangle(image, (122, 20), (138, 290), 230, -1)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


@pytest.mark.parametrize("after_resize", [False, True])
@pytest.mark.parametrize("work_side", [None, 40])
def test_severity_0_is_the_shifted_path_at_a_null_shift(radiograph, tmp_path, work_side, after_resize):
    """Through the bench's real code (run_bench): a shift that changes nothing gives, at every severity, exactly the
    severity-0 view, so a row's change from severity 0 is its shift's alone (severity 0 once came from libjpeg's
    reduced decode and the shifts from the full decode, 0.84 grey levels apart on average at 224 px)."""
    import torch

    from chestxray.data.images import ImageLimits
    from chestxray.evaluation.robustness import Shift, run_bench

    path = tmp_path / "large.jpg"  # large enough for a reduced decode at 32 px
    cv2.imwrite(str(path), cv2.cvtColor(radiograph, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    null = Shift("null", "nothing", lambda im, k, size, seed: im, after_resize)
    seen = []

    def recorder(batch):
        seen.append(batch.clone())
        return torch.zeros(len(batch), 3)

    run_bench(recorder, False, [(path, 0)], 32, [null], ImageLimits(), "cpu", 64, work_side)
    views = seen[0].numpy()
    assert views.shape == (1 + SEVERITIES, 3, 32, 32)
    assert all(np.array_equal(views[0], views[k]) for k in range(1, 1 + SEVERITIES))


def test_no_shift_writes_into_the_decoded_image(radiograph):
    before = radiograph.copy()
    for shift in SHIFTS.values():
        for k in range(1 + SEVERITIES):
            shift.apply(radiograph, k, SIZE, 7)
    assert np.array_equal(radiograph, before)


def test_downsample_shrinks_an_image_already_smaller_than_the_models_input(radiograph):
    """downsample is relative to the detail the model's input holds (the image's side where that is smaller): a
    100 px image at a 224 px input still loses resolution at every severity."""
    small = cv2.resize(radiograph, (90, 100), interpolation=cv2.INTER_AREA)
    views = shifted_views(small, 224, [SHIFTS["downsample"]], seed=7).astype(np.float64)
    distance = [np.abs(views[k] - views[0]).mean() for k in range(1 + SEVERITIES)]
    assert distance[0] == 0 and all(b > a for a, b in zip(distance, distance[1:], strict=False)), distance


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_severity_changes_the_model_view_more_than_the_one_before(name, size, radiograph):
    views = shifted_views(radiograph, size, [SHIFTS[name]], seed=7).astype(np.float64)
    assert views.shape == (1 + SEVERITIES, 3, size, size)
    distance = [np.abs(views[k] - views[0]).mean() for k in range(1 + SEVERITIES)]
    assert distance[0] == 0
    assert all(b > a for a, b in zip(distance, distance[1:], strict=False)), distance


def test_shifts_setting_is_checked():
    assert [s.name for s in chosen_shifts(["blur", "jpeg"])] == ["blur", "jpeg"]
    assert len(chosen_shifts("all")) == len(SHIFTS)
    with pytest.raises(ConfigError, match="shifts=.*must be all or a list of"):
        chosen_shifts(["blurr"])


def _table(folder):
    with open(folder / "robustness.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow  # a subprocess or a whole export: the full suite
def test_the_command_writes_table_figure_and_tensorboard_in_its_own_run_folder(tiny_run, tmp_path):
    ckpt = run_copy(tiny_run, tmp_path, with_settings=True)
    out = tmp_path / "bench"
    run_script(
        "-m",
        "chestxray.robustness",
        f"ckpt={ckpt}",
        f"inputs={tiny_run['data'] / 'test'}",
        f"hydra.run.dir={out}",
        "shifts=[contrast,noise,text]",
        "device=cpu",
    )
    rows = _table(out)
    assert [(r["shift"], int(r["severity"])) for r in rows] == [
        (s, k) for s in ("contrast", "noise", "text") for k in range(SEVERITIES + 1)
    ]
    assert all(int(r["n"]) == 39 for r in rows)  # 12 test images per class and the 3 copies of train images
    assert all(int(r["leak_free_n"]) == 36 for r in rows)  # the generated data's 3 leaks are found and left out
    assert len({r["accuracy"] for r in rows if r["severity"] == "0"}) == 1  # one clean accuracy, on every curve
    shares = [float(r["share_flagged_ood"]) for r in rows]  # the checkpoint's detector, fitted in training
    assert all(0 <= s <= 1 for s in shares)
    md = (out / "robustness.md").read_text()
    assert "| contrast |" in md and "Machine: " in md and "the share the checkpoint's detector flags" in md
    assert (out / "robustness.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    second = run_script(
        "-m", "chestxray.robustness", f"ckpt={ckpt}", f"inputs={tiny_run['data'] / 'test'}", f"hydra.run.dir={out}",
        ok=False,
    )  # fmt: skip
    assert second.returncode == 2 and "holds" in second.stderr  # never into another run's folder


def test_leak_free_is_n_a_without_the_runs_settings(tiny_run, tmp_path):
    ckpt = run_copy(tiny_run, tmp_path, with_settings=False)
    out = tmp_path / "bench"
    cfg = compose_config(
        "robustness",
        [f"ckpt={ckpt}", f"inputs={tiny_run['data'] / 'test'}", f"paths.output_dir={out}", "shifts=[blur]"]
        + ["work_side=48"],
    )
    summary = robustness(cfg)
    assert summary["work_side"] == 48 and "at most 48 px" in (out / "robustness.md").read_text()
    assert summary["clean_leak_free_accuracy"] is None
    assert summary["leak_free"].startswith(f"n/a (ckpt={ckpt} saved no data settings")
    assert all(r["leak_free_accuracy"] == "" for r in _table(out))
    assert "Leak-free: n/a" in (out / "robustness.md").read_text()


def test_a_setting_out_of_range_is_one_line(tiny_run, tmp_path):
    cfg = compose_config(
        "robustness",
        [f"ckpt={tiny_run['ckpt']}", "inputs=x", f"paths.output_dir={tmp_path}", "batch_size=0"],
    )
    with pytest.raises(ConfigError, match="batch_size=0: must be an integer at least 1"):
        robustness(cfg)


def test_drop_leaking_clears_a_runs_own_test_images_only(tiny_run, tmp_path):
    """data.drop_leaking=true dropped the train copies of the run's test images: those leak no more; any other
    inputs (another folder holding copies of train images) are still compared with every train image."""
    from chestxray.data.images import ImageLimits
    from chestxray.evaluation.robustness import leak_mask_of_runs
    from chestxray.models.checkpoints import training_data

    run = training_data(run_copy(tiny_run, tmp_path, with_settings=True, drop_leaking=True))
    test = sorted(p for p in (tiny_run["data"] / "test").rglob("*.*") if p.is_file())
    assert sum(p.name.startswith("leak_") for p in test) == 3  # test images whose train copies were dropped
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted((tiny_run["data"] / "train" / "Covid").iterdir())[:2]:
        (other / path.name).write_bytes(path.read_bytes())
    for inputs in (test, [*test, *sorted(other.iterdir())]):  # mixed with other images, the test images stay clear
        mask, note = leak_mask_of_runs([run], inputs, ImageLimits())
        assert mask is not None and not mask[: len(test)].any(), note
        assert mask[len(test) :].all() and "its own test and evaluation images leak no more" in note


def test_the_train_images_come_with_the_checkpoint_wherever_it_lies(tiny_run, tmp_path):
    """The leak check reads the data settings saved in the checkpoint: a checkpoint moved out of its run folder, or
    adapt.py's adapted.ckpt in a run folder whose .hydra/config.yaml has no data settings, still finds the
    generated data's 3 copies of train images (the run's own .hydra/config.yaml once crashed the bench there)."""
    from chestxray.data.images import ImageLimits
    from chestxray.evaluation.robustness import leak_mask_of_runs
    from chestxray.models.checkpoints import training_data

    moved = tmp_path / "moved.ckpt"
    shutil.copy(tiny_run["ckpt"], moved)
    adapted = tmp_path / "adapt-run" / "checkpoints" / "adapted.ckpt"
    adapted.parent.mkdir(parents=True)
    shutil.copy(tiny_run["ckpt"], adapted)
    (tmp_path / "adapt-run" / ".hydra").mkdir()
    OmegaConf.save({"site": "somewhere", "ckpt": str(moved)}, tmp_path / "adapt-run" / ".hydra" / "config.yaml")
    test = sorted(p for p in (tiny_run["data"] / "test").rglob("*.*") if p.is_file())
    for ckpt in (moved, adapted):
        mask, note = leak_mask_of_runs([training_data(ckpt)], test, ImageLimits())
        assert mask is not None and sorted(p.name for p, m in zip(test, mask, strict=True) if m) == sorted(
            p.name for p in test if p.name.startswith("leak_")
        ), note
        assert note.startswith(f"compared with the {len(training_data(ckpt).train)} train images of ")
    cfg = compose_config(
        "robustness",
        [f"ckpt={adapted}", f"inputs={tiny_run['data'] / 'test'}", f"paths.output_dir={tmp_path}/o", "shifts=[blur]"],
    )
    assert robustness(cfg)["clean_leak_free_accuracy"] is not None


def test_inputs_none_of_which_can_be_read_are_one_line(tiny_run, tmp_path):
    from chestxray.errors import PredictError

    for name in ("Normal", "Covid"):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    cfg = compose_config(
        "robustness",
        [f"ckpt={tiny_run['ckpt']}", f"inputs={tmp_path / 'in'}", f"paths.output_dir={tmp_path}/o", "shifts=[blur]"],
    )
    with pytest.raises(PredictError, match=r"^none of the 2 labelled input image\(s\) could be read"):
        robustness(cfg)


def test_severity_0_is_the_benchs_one_decode_preprocessed_as_predict_does(synthetic_dir):
    """The clean view is the bench's one decode (full, or brought to work_side), resized and preprocessed
    (data.preprocess) as predict.py's model_view does; not predict.py's reduced JPEG decode (0.84 grey levels apart
    on average on the real test images at 224 px; README)."""
    import torch

    from chestxray.data.images import ImageLimits, decode_bytes, read_bytes, resize_square
    from chestxray.data.preprocess import preprocess_image
    from chestxray.evaluation.robustness import run_bench, working_image

    seen = []

    def recorder(batch):
        seen.append(batch.clone())
        return torch.zeros(len(batch), 3)

    path = sorted((synthetic_dir / "test" / "Covid").glob("*.jp*g"))[0]
    for preprocess in ("none", "clahe"):
        for work_side in (None, 40):
            seen.clear()
            limits = ImageLimits(preprocess=preprocess)
            result = run_bench(recorder, None, [(path, 1)], 32, [SHIFTS["noise"]], limits, "cpu", 64, work_side)
            assert result.correct.shape == (1, 1 + SEVERITIES)
            decoded = working_image(decode_bytes(read_bytes(path), path, work_side, limits), work_side)
            expected = preprocess_image(resize_square(decoded, 32), preprocess).transpose(2, 0, 1)
            assert np.array_equal(seen[0][0].numpy(), expected), (preprocess, work_side)
