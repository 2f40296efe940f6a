"""adapt.py and the folder-level alarm: the alarm fires on a shifted folder and not on an exchangeable one; every
after-adaptation number comes from models that never saw the image; the command end to end on generated data;
too few images per class refused in one line."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from chestxray.data.images import load_image
from chestxray.data.sources import find_inputs
from chestxray.errors import AdaptError
from chestxray.evaluation.robustness import SHIFTS
from chestxray.evaluation.selective import shift_alarm
from chestxray.inference.predict import predict
from chestxray.models import ood
from chestxray.models.checkpoints import load_model, training_data
from chestxray.synthetic import make_dataset
from chestxray.training import adapt as adapt_module
from tests.conftest import compose_config, predict_config, run_copy, run_script

PATIENT = "PATIENT-SECRET-"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A generated site: 6 images per class in class folders, two images per patient, named in MANIFEST.tsv; a
    third of the patients' images under a strong acquisition shift (unlike the training images, as at a new site)."""
    root = tmp_path_factory.mktemp("site")
    make_dataset(root / "gen", {"train": 6}, size=96, seed=7)
    folder = root / "site"
    rows = []
    for k, path in enumerate(sorted((root / "gen" / "train").rglob("*.*"))):
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (k // 2) % 3 == 0:
            hwc = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2RGB)
            hwc = SHIFTS["noise"].apply(SHIFTS["contrast"].apply(hwc, 4, 96, k), 5, 96, k)
            target = target.with_suffix(".png")
            cv2.imwrite(str(target), cv2.cvtColor(hwc, cv2.COLOR_RGB2GRAY))
        else:
            target.write_bytes(path.read_bytes())
        rows.append({"path": f"{path.parent.name}/{target.name}", "patient": f"{PATIENT}{k // 2}"})
    with open(folder / "MANIFEST.tsv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "patient"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def adapt_config(out: Path, ckpt: Path, site: Path, *overrides: str):
    return compose_config(
        "adapt", [f"ckpt={ckpt}", f"site={site}", f"paths.output_dir={out}", "epochs=5", "folds=3", *overrides]
    )


def test_the_alarm_fires_on_a_shifted_folder_and_not_on_an_exchangeable_one(tiny_run):
    model = load_model(tiny_run["ckpt"])
    inputs = find_inputs(str(tiny_run["data"] / "test"), model.classes)
    images = np.stack([load_image(i.path, 32) for i in inputs])

    def shifted(image: np.ndarray) -> np.ndarray:
        hwc = SHIFTS["contrast"].apply(image.transpose(1, 2, 0), 4, 32, 0)
        return SHIFTS["noise"].apply(hwc, 5, 32, 0).transpose(2, 0, 1)

    alarms = {}
    for name, batch in (("exchangeable", images), ("shifted", np.stack([shifted(i) for i in images]))):
        flagged = int((~ood.score_images(model, batch).in_distribution).sum())
        alarms[name] = shift_alarm(flagged, len(batch), model.pass_rate)
    assert not alarms["exchangeable"].fired and alarms["shifted"].fired
    assert alarms["shifted"].text().startswith("ALARM") and "python adapt.py" in alarms["shifted"].text()
    # exchangeable sets, flagged at the threshold's own rate, fire about `level` of the time, no more
    rng = np.random.default_rng(0)
    fired = [shift_alarm(int(rng.binomial(66, 0.05)), 66, 0.95).fired for _ in range(2000)]
    assert np.mean(fired) <= 0.01


def test_after_adaptation_answers_never_come_from_a_model_that_saw_the_image(tiny_run, site, tmp_path, monkeypatch):
    """Every fitting call (recalibration and fine-tuning) of a fold is given none of that fold's held-out images,
    and each patient is on one side only: a fitter that leaked the held-out images would fail here."""
    seen_site: list[torch.Tensor] = []
    fits: list[torch.Tensor] = []
    trunk, fitted = adapt_module.trunk_features, adapt_module.adapted_model

    def record_trunk(model, images, batch_size=32):
        features = trunk(model, images, batch_size)
        seen_site.append(features)
        return features

    def record_fit(model, candidate, features, labels, extra, tuning):
        fits.append(features)
        return fitted(model, candidate, features, labels, extra, tuning)

    monkeypatch.setattr(adapt_module, "trunk_features", record_trunk)
    monkeypatch.setattr(adapt_module, "adapted_model", record_fit)
    splits_seen = []
    split = adapt_module.split
    monkeypatch.setattr(adapt_module, "split", lambda *a: splits_seen.append(split(*a)) or splits_seen[-1])
    adapt_module.adapt(adapt_config(tmp_path / "out", tiny_run["ckpt"], site))
    site_features = seen_site[0]
    folds = splits_seen[0]
    candidates = 2
    assert len(fits) == candidates * len(folds) + 1  # each candidate once per fold, then the final fit on all
    site_obj = adapt_module.read_site(site, load_model(tiny_run["ckpt"]), adapt_module.ImageLimits(10**8, 32))
    for k, features in enumerate(fits[:-1]):
        fit_idx, held_idx = folds[k % len(folds)]
        assert not set(site_obj.groups[fit_idx]) & set(site_obj.groups[held_idx])  # patients on one side
        rows = {tuple(r.tolist()) for r in features}
        assert all(tuple(site_features[i].tolist()) not in rows for i in held_idx)
        assert all(tuple(site_features[i].tolist()) in rows for i in fit_idx)
    assert sorted(np.concatenate([h for _, h in folds]).tolist()) == list(range(len(site_features)))


def test_cross_fit_refuses_a_fold_whose_fitting_images_include_held_out_ones():
    leaky = [(np.arange(6), np.array([4, 5]))]
    with pytest.raises(ValueError, match="held-out"):
        adapt_module.cross_fit(6, leaky, lambda fit, held: {"x": np.zeros(len(held))})


@pytest.mark.slow  # a subprocess: the test below runs the same work in process in the fast tier
def test_adapt_py_prints_its_summary_and_writes_no_patient_identifier_anywhere(tiny_run, site, tmp_path):
    out = tmp_path / "adapt"
    result = run_script("adapt.py", f"ckpt={tiny_run['ckpt']}", f"site={site}", f"hydra.run.dir={out}", "epochs=5")
    report = json.loads((out / "site_report.json").read_text())
    before, after = report["before"]["failure_auroc"], report["after"][report["chosen"]]["failure_auroc"]
    assert f"failure AUROC of confidence {before:.3f} -> {after:.3f}" in result.stdout
    assert "adapted checkpoint" in result.stdout and (out / "checkpoints" / "adapted.ckpt").is_file()
    assert list(out.rglob("*.log"))
    for written in [*out.rglob("*.json"), *out.rglob("*.md"), *out.rglob("*.log"), *out.rglob("*.yaml")]:
        assert PATIENT not in written.read_text(errors="ignore"), written  # no patient identifier in any output


def test_adapt_end_to_end_writes_a_report_and_a_checkpoint_predict_takes(tiny_run, site, tmp_path, capsys):
    out = tmp_path / "adapt"
    returned = adapt_module.adapt(adapt_config(out, tiny_run["ckpt"], site))
    printed = capsys.readouterr().out
    report = json.loads((out / "site_report.json").read_text())
    assert report["chosen"] == returned["chosen"] and report["images"] == returned["images"]
    assert report["images"] == 18 and report["grouped_by_patient"] and report["groups"] == 9
    for side in (report["before"], *report["after"].values()):
        assert 0 <= side["accuracy"] <= 1 and side["accuracy_ci95"][0] <= side["accuracy"] <= side["accuracy_ci95"][1]
        assert {"share_flagged", "alarm", "set_coverage", "share_accepted", "failure_auroc"} <= set(side)
    assert report["chosen"] in report["after"]
    assert "Site report" in (out / "site_report.md").read_text() and (out / "site_risk_coverage.png").exists()
    assert "accuracy" in printed and "adapted checkpoint" in printed
    before, after = report["before"]["failure_auroc"], report["after"][report["chosen"]]["failure_auroc"]
    assert f"failure AUROC of confidence {before:.3f} -> {after:.3f}" in printed
    for written in [*out.rglob("*.json"), *out.rglob("*.md")]:
        assert PATIENT not in written.read_text(errors="ignore"), written  # no patient identifier in any output
    model = load_model(out / "checkpoints" / "adapted.ckpt")
    assert bool(model.selective.fitted) and int(model.ood.n_fit) == 18 and len(model.ood.bank) > 18
    trained = load_model(tiny_run["ckpt"])  # the confidence's gate: the training rows and thresholds, kept
    assert int(model.ood.origin_rows.sum()) == len(trained.ood.bank) and not model.ood.origin_rows[-18:].any()
    assert torch.equal(model.ood.origin_thresholds, trained.ood.thresholds)
    capsys.readouterr()
    predict(predict_config(tmp_path / "pred", out / "checkpoints" / "adapted.ckpt", site))  # in process: predict.py's
    assert "accepted" in capsys.readouterr().out  # own subprocess runs are in test_predict.py
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert len(rows) == 18 and all(r["accepted"] in ("0", "1") for r in rows)
    # predict.py's confidence of the adapted checkpoint is adapt.py's (the gate included), image by image
    from chestxray.data.images import ImageLimits
    from chestxray.models import recalibrate
    from chestxray.models.checkpoints import preprocess_of

    images = adapt_module.read_site(site, model, ImageLimits(10**8, 1, preprocess=preprocess_of(model)))
    features = adapt_module.trunk_features(model, images.images)
    expected = recalibrate.outputs(model, adapt_module.head_logits(model, features), features)["confidence"]
    by_path = {str(path.resolve()): c for path, c in zip(images.paths, expected, strict=True)}
    written = {str(Path(r["path"]).resolve()): float(r["confidence"]) for r in rows}
    assert written.keys() == by_path.keys()
    assert all(abs(written[k] - by_path[k]) < 1e-4 for k in written), (written, by_path)
    # the shifted images: in distribution for the recalibrated flag, still gated as unlike the training images
    assert any(r["in_distribution"] == "1" and float(r["confidence"]) < 0 for r in rows)
    # adapted.ckpt records the site images it was fitted on: its leak-free numbers leave them out, and adapting it
    # again on them is refused (in-sample), while the source checkpoint compares them with its train images only
    from chestxray.evaluation.robustness import leak_mask_of_runs

    adapted = out / "checkpoints" / "adapted.ckpt"
    mask, note = leak_mask_of_runs([training_data(adapted)], images.paths, ImageLimits())
    assert mask.all() and note.endswith(
        f"and the site images adapt.py fitted it on (18 of {site}) (18 of 18 inputs duplicate one, 40 bits)"
    ), note
    source, _ = leak_mask_of_runs([training_data(tiny_run["ckpt"])], images.paths, ImageLimits())
    assert not source.all()
    with pytest.raises(AdaptError, match=r"no image left once 18 copies of training images are left out$"):
        adapt_module.adapt(adapt_config(tmp_path / "again", adapted, site))


def small_site(site: Path, folder: Path) -> Path:
    """The generated site with 2 Covid images, below min_per_class=3."""
    for name in ("Normal", "Covid", "Viral Pneumonia"):
        files = sorted(p for p in (site / name).iterdir() if p.is_file())
        for path in files[:2] if name == "Covid" else files:
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / path.name).write_bytes(path.read_bytes())
    return folder


def test_too_few_images_of_a_class_are_refused_in_one_line(tiny_run, site, tmp_path):
    with pytest.raises(AdaptError) as err:
        adapt_module.adapt(adapt_config(tmp_path / "o", tiny_run["ckpt"], small_site(site, tmp_path / "small")))
    message = str(err.value)
    assert "\n" not in message and "Covid has 2 image(s)" in message and "min_per_class=3" in message
    assert not (tmp_path / "o" / "checkpoints").exists()  # refused before anything is written


@pytest.mark.slow
def test_adapt_py_refuses_too_few_images_in_one_line_with_exit_2(tiny_run, site, tmp_path):
    args = (f"ckpt={tiny_run['ckpt']}", f"site={small_site(site, tmp_path / 'small')}", f"hydra.run.dir={tmp_path}/o")
    result = run_script("adapt.py", *args, ok=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "AdaptError" in line]
    assert len(lines) == 1 and "Covid has 2 image(s)" in lines[0] and "min_per_class=3" in lines[0]


def test_init_from_starts_a_new_run_from_a_checkpoints_network_weights_only(tiny_run, tmp_path):
    from chestxray.errors import CheckpointError, ConfigError
    from chestxray.training.fit import instantiate_model
    from tests.conftest import train_config

    saved = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    cfg = train_config(tmp_path / "run", tiny_run["data"], f"model.init_from={tiny_run['ckpt']}")
    model = instantiate_model(cfg)
    fresh = instantiate_model(train_config(tmp_path / "run2", tiny_run["data"]))
    for key, value in model.state_dict().items():
        if key.startswith("net."):
            assert torch.equal(value, saved[key]), key
    head = "net.classifier.4.weight"
    assert not torch.equal(fresh.state_dict()[head], saved[head])  # without it, a new initialisation
    assert "init_from" not in model.hparams and cfg.model.init_from == str(tiny_run["ckpt"])
    with pytest.raises(CheckpointError, match="model.init_from=.*file not found"):
        instantiate_model(train_config(tmp_path / "r3", tiny_run["data"], f"model.init_from={tmp_path}/none.ckpt"))
    with pytest.raises(ConfigError, match="pick one"):
        both = [f"model.init_from={tiny_run['ckpt']}", f"ckpt_path={tiny_run['ckpt']}"]
        instantiate_model(train_config(tmp_path / "r4", tiny_run["data"], *both))


def test_init_from_a_run_that_split_the_same_images_another_way_warns_that_validation_flatters(
    tiny_run, tmp_path, caplog
):
    """Starting from a checkpoint trained on the same train images with another data.seed (or fold, folds,
    val_fraction): some of this run's validation images were its training images. The same split, or other data,
    says nothing."""
    from chestxray.training.fit import instantiate_model
    from tests.conftest import train_config

    start = f"model.init_from={tiny_run['ckpt']}"
    saved = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    with caplog.at_level("WARNING", logger="chestxray.training.fit"):
        instantiate_model(train_config(tmp_path / "same", tiny_run["data"], start))
        assert not caplog.records
        instantiate_model(train_config(tmp_path / "other", tmp_path, start))  # other train images
        assert not caplog.records
        instantiate_model(train_config(tmp_path / "folds", tiny_run["data"], start, "data.folds=10"))  # unused
        assert not caplog.records  # without data.fold, the hold-out split ignores data.folds
        instantiate_model(train_config(tmp_path / "seed", tiny_run["data"], start, f"data.seed={saved['seed'] + 1}"))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "trained on the same train images split another way" in said[0]
    assert f"data.seed={saved['seed'] + 1} here, {saved['seed']} there" in said[0]


def test_adapt_settings_out_of_range_are_refused_naming_the_setting(tmp_path):
    from chestxray import settings
    from chestxray.errors import ConfigError

    for override, name in (("folds=1", "folds"), ("finetune_level=1.5", "finetune_level"), ("epochs=0", "epochs")):
        cfg = compose_config("adapt", ["ckpt=x.ckpt", "site=y", f"paths.output_dir={tmp_path}", override])
        with pytest.raises(ConfigError, match=rf"^{name}="):
            settings.check(cfg, settings.ADAPT_RULES)


def _limits(model):
    from chestxray.data.images import ImageLimits
    from chestxray.models.checkpoints import preprocess_of

    return ImageLimits(10**8, 1, preprocess=preprocess_of(model))


def _manifest(folder: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> None:
    text = "path\tpatient\n" + "".join(f"{path}\t{patient}\n" for path, patient in rows)
    (folder / "MANIFEST.tsv").write_bytes(text.encode(encoding))


def test_a_manifest_is_read_as_label_files_are_and_grouped_only_where_it_names_the_sites_images(site, tmp_path):
    """A byte-order mark is fine; a file that is not UTF-8 is one error naming the line; a manifest whose paths
    match none of the images does not claim patient grouping."""
    from chestxray.errors import DataError

    paths = sorted(p for p in site.rglob("*") if p.parent != site and p.is_file())[:4]
    rows = [(f"{p.parent.name}/{p.name}", "Müller" if k < 2 else "Jones") for k, p in enumerate(paths)]
    folder = tmp_path / "s"
    folder.mkdir()
    for p in paths:
        (folder / p.parent.name).mkdir(exist_ok=True)
        (folder / p.parent.name / p.name).write_bytes(p.read_bytes())
    mine = [folder / p.parent.name / p.name for p in paths]
    _manifest(folder, rows, "utf-8-sig")
    groups, by_patient = adapt_module.patient_groups(folder, mine)
    assert by_patient and groups.tolist() == [0, 0, 1, 1]
    _manifest(folder, rows, "latin-1")
    with pytest.raises(DataError, match=r"MANIFEST.tsv: line 2 is not UTF-8"):
        adapt_module.patient_groups(folder, mine)
    _manifest(folder, [(Path(path).name, patient) for path, patient in rows])  # bare names: not the site's paths
    groups, by_patient = adapt_module.patient_groups(folder, mine)
    assert not by_patient and groups.tolist() == [0, 1, 2, 3]


def test_sites_adapt_cannot_use_are_refused_in_one_line(tiny_run, site, tmp_path):
    """One patient for every image, no readable image, an ensemble, a checkpoint without its end-of-training fit
    (whose "before" numbers would be a flag share of nan and sets covering 100%): AdaptError, before anything is
    written."""
    one = tmp_path / "one"
    for name in ("Normal", "Covid"):
        for path in sorted((site / name).iterdir())[:3]:
            (one / name).mkdir(parents=True, exist_ok=True)
            (one / name / path.name).write_bytes(path.read_bytes())
    _manifest(one, [(f"{p.parent.name}/{p.name}", "ANON1") for p in sorted(one.rglob("*.*")) if p.parent != one])
    broken = tmp_path / "broken"
    for name in ("Normal", "Covid"):
        (broken / name).mkdir(parents=True)
        for k in range(3):
            (broken / name / f"{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    ckpt = str(tiny_run["ckpt"])
    cases = [
        (one, ckpt, "all 6 images are of one patient"),
        (broken, ckpt, "none of its 6 labelled image(s) could be read"),
        (site, f"[{ckpt},{ckpt}]", "adapt.py takes one checkpoint"),
        (site, str(tiny_run["dir"] / "checkpoints" / "last.ckpt"), "carries no out-of-distribution detector fitted"),
    ]
    for folder, which, expected in cases:
        cfg = compose_config(
            "adapt", [f"ckpt={which}", f"site={folder}", f"paths.output_dir={tmp_path}/o", "epochs=5", "folds=3"]
        )
        with pytest.raises(AdaptError) as err:
            adapt_module.adapt(cfg)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "o" / "checkpoints").exists()


def test_unlabelled_folders_are_named_and_copies_of_training_images_left_out(tiny_run, site, tmp_path, caplog):
    """A folder that names no class is left out with a warning naming it, and an image above the site in a folder
    named like a class is not labelled by it; site images that copy the checkpoint's training images are left out of
    every number (the checkpoint saw them), and the report says how many."""
    import shutil

    ckpt = run_copy(tiny_run, tmp_path, with_settings=True)
    model = load_model(ckpt)
    folder = tmp_path / "Covid" / "site"  # a folder named like a class above the site
    shutil.copytree(site, folder)
    (folder / "Pneumonia").mkdir()
    for path in sorted((site / "Normal").iterdir())[:2]:
        (folder / "Pneumonia" / path.name).write_bytes(path.read_bytes())
    train = sorted((tiny_run["data"] / "train" / "Normal").iterdir())[:2]
    for path in train:
        (folder / "Normal" / f"copy-{path.name}").write_bytes(path.read_bytes())
    with caplog.at_level("WARNING"):
        read = adapt_module.read_site(folder, model, _limits(model))
    assert len(read.paths) == 18 + 2  # the Pneumonia folder's images are not labelled Covid from above
    assert any("2 image(s) in Pneumonia/, which name no class" in r.getMessage() for r in caplog.records)
    kept, note = adapt_module.drop_training_copies(read, training_data(ckpt), _limits(model))
    assert kept.training_copies == 2 and len(kept.paths) == 18 and "2 site image(s) copy a training image" in note
    assert not any(p.name.startswith("copy-") for p in kept.paths)
    assert len(kept.labels) == len(kept.groups) == len(kept.images) == 18
    bare = run_copy(tiny_run, tmp_path / "bare", with_settings=False)  # a checkpoint that names no train images
    unknown, why = adapt_module.drop_training_copies(read, training_data(bare), _limits(model))
    assert unknown.training_copies is None and len(unknown.paths) == 20 and why.startswith("not compared")


def test_a_dicom_sites_patients_are_grouped_by_their_patient_id_as_training_groups_them(site, tmp_path):
    """Without MANIFEST.tsv, DICOM files of one patient are one group (an opaque key; the ID is never kept)."""
    from tests.test_dicom import dataset, save, stored

    grey = cv2.imread(str(sorted((site / "Normal").iterdir())[0]), cv2.IMREAD_GRAYSCALE)
    paths = []
    for k in range(6):
        (tmp_path / "Normal").mkdir(exist_ok=True)
        picture = np.roll(grey, 5 * k, axis=0)
        ds = dataset(stored(picture, 12), 12, PatientID=f"{PATIENT}{k // 3}")
        paths.append(save(ds, tmp_path / "Normal" / f"{k}.dcm"))
    paths.append(tmp_path / "Normal" / "plain.png")
    cv2.imwrite(str(paths[-1]), grey)
    groups, by_patient = adapt_module.patient_groups(tmp_path, paths)
    assert by_patient and groups.tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_copies_of_training_images_are_found_after_drop_leaking_and_a_site_of_copies_is_refused(tiny_run, tmp_path):
    """data.drop_leaking dropped the train copies of the run's test images, not of a new site's: a site image that
    copies a train image still is one. A site left with nothing (or too little) says that copies were left out."""
    ckpt = run_copy(tiny_run, tmp_path, with_settings=True, drop_leaking=True)
    site = tmp_path / "copies"
    for name in ("Normal", "Covid"):
        (site / name).mkdir(parents=True)
        for path in sorted((tiny_run["data"] / "train" / name).iterdir())[:3]:
            (site / name / path.name).write_bytes(path.read_bytes())
    model, limits = load_model(ckpt), _limits(load_model(ckpt))
    read = adapt_module.read_site(site, model, limits)
    kept, note = adapt_module.drop_training_copies(read, training_data(ckpt), limits)
    assert kept.training_copies == 6 and not kept.paths, note
    cfg = adapt_config(tmp_path / "o", ckpt, site)
    with pytest.raises(AdaptError, match=r"no image left once 6 copies of training images are left out$"):
        adapt_module.adapt(cfg)
    assert adapt_module.adapt(adapt_config(tmp_path / "o2", ckpt, site, "check_training_copies=false"))["images"] == 6


def test_the_adapted_checkpoint_is_written_whole_or_not_at_all(tiny_run, site, tmp_path, monkeypatch):
    """A write that fails half-way (a kill, a full disk) leaves no adapted.ckpt: a checkpoints/ folder holding half a
    file would pass for a finished run."""
    model = load_model(tiny_run["ckpt"])
    read = adapt_module.read_site(site, model, _limits(model))
    target = tmp_path / "checkpoints" / "adapted.ckpt"

    def half(obj, fh):
        fh.write(b"PK\x03\x04 half a zip archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapt_module.torch, "save", half)
    with pytest.raises(OSError, match="No space left"):
        adapt_module.write_checkpoint(str(tiny_run["ckpt"]), model, {}, target, False, read, str(site))
    assert not target.exists() and not list(target.parent.iterdir())


def test_site_images_an_adapted_checkpoint_was_fitted_on_are_never_leak_free(tiny_run, tmp_path):
    """Even where data.drop_leaking=true cleared them (the site was one of the run's evaluation sets), and a record
    whose images are gone makes the check n/a rather than count them as new."""
    import os

    from chestxray.data.images import ImageLimits
    from chestxray.evaluation.robustness import leak_mask_of_runs
    from chestxray.models.checkpoints import ADAPTED_ON

    test = sorted(p for p in (tiny_run["data"] / "test").rglob("*.*") if p.is_file())
    ckpt = run_copy(tiny_run, tmp_path, with_settings=True, drop_leaking=True)  # its test images: cleared
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    fitted = test[:4]
    record = {"site": "site", "paths": [os.path.realpath(p) for p in fitted], "labels": [0, 0, 0, 0]}
    torch.save({**checkpoint, ADAPTED_ON: [record]}, ckpt)
    mask, note = leak_mask_of_runs([training_data(ckpt)], test, ImageLimits())
    assert mask[:4].all() and "the site images adapt.py fitted it on (4 of site)" in note, note
    assert not any(m for p, m in zip(test, mask, strict=True) if p not in fitted and not p.name.startswith("leak_"))
    record["paths"][0] = str(tmp_path / "moved-away.png")
    torch.save({**checkpoint, ADAPTED_ON: [record]}, ckpt)
    unknown = training_data(ckpt)
    assert unknown.train is None and "are not all here" in unknown.note
    assert leak_mask_of_runs([unknown], test, ImageLimits())[0] is None
