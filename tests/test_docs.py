"""The README and the manual (docs/) stay true to the code: every train.py, predict.py and robustness command they
show composes with Hydra and passes the settings' checks, and the printouts they paste keep today's wording."""

from __future__ import annotations

import re
import shlex

import pytest

from chestxray import settings
from tests.conftest import ROOT, compose_config

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = {
    "train.py": ("train", settings.TRAIN_RULES),
    "predict.py": ("predict", settings.PREDICT_RULES),
    "adapt.py": ("adapt", settings.ADAPT_RULES),
    "chestxray.robustness": ("robustness", settings.ROBUSTNESS_RULES),
}
PATHS = ("ckpt=", "inputs=", "site=")  # files of the writer's machine: the test composes with placeholders


def _commands() -> list[tuple[str, str, list[str]]]:
    """(page, command line, its overrides) for each `python train.py|predict.py|adapt.py ...` and `python -m
    chestxray.robustness ...` line in a fenced block (also pasted after a `$ ` prompt)."""
    found = []
    for page in PAGES:
        in_code = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
                continue
            line = line.split("  #", 1)[0].strip().removeprefix("$ ")
            if not in_code or not line.startswith("python "):
                continue
            words = shlex.split(line)
            if words[1:2] == ["-m"]:  # python -m chestxray.robustness ...: the module is the script
                words = words[:1] + words[2:]
            script = words[1] if len(words) > 1 else ""
            if script in CONFIGS and not any(w.startswith("--") for w in words):
                found.append((page.name, line, [w for w in words[2:] if w != "-m"]))
    return found


def _first_of_sweep(override: str) -> str:
    """A sweep's first value (optimizer.lr=1e-4,1e-3 -> optimizer.lr=1e-4): compose takes one run's settings."""
    key, _, value = override.partition("=")
    if "," in value and not value.startswith(("[", "'", '"')):
        value = value.split(",", 1)[0]
    return f"{key}={value}"


def test_the_pages_show_commands():
    pages = {page for page, _, _ in _commands()}
    assert {"README.md", "training.md", "predict.md", "new-hospital.md", "robustness.md"} <= pages
    scripts = {shlex.split(line.removeprefix("python -m "))[0 if "-m " in line else 1] for _, line, _ in _commands()}
    assert set(CONFIGS) <= scripts | {"chestxray.robustness"} and "adapt.py" in scripts


@pytest.mark.slow  # a Hydra compose per command: seconds each
@pytest.mark.parametrize("page,line,overrides", _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_on_the_pages_composes_and_passes_the_checks(page, line, overrides, tmp_path):
    words = shlex.split(line)
    name, rules = CONFIGS[words[2] if words[1] == "-m" else words[1]]
    overrides = [_first_of_sweep(o) for o in overrides if not o.startswith("hydra.")]
    overrides = [o.split("=", 1)[0] + "=x" if "<" in o else o for o in overrides]  # placeholders: <date>_<time>
    overrides = [o if not o.startswith(PATHS) else o.split("=", 1)[0] + "=x" for o in overrides]
    if name == "predict":
        overrides += [o for o in ("ckpt=x", "inputs=x") if not any(p.startswith(o[:5]) for p in overrides)]
        settings.check_predict_overrides(overrides)
    cfg = compose_config(name, [*overrides, f"paths.output_dir={tmp_path}"])
    settings.check(cfg, rules)


def test_pasted_printouts_use_todays_wording():
    """Lines from an older printout that the code no longer writes (the drift a new user met in the README), on the
    front pages; a manual page that still pastes an older run says so in a note at its top."""
    stale = [
        re.compile(r"prediction sets \(target coverage"),  # now: "90% prediction sets (guarantee from ...)"
        re.compile(r"accuracy [0-9.]+ \(\d+/\d+ labelled images\)"),  # now counts: "2 of 3 labelled image(s) right"
        re.compile(r"\bcoverage \d+\.\d%, mean size"),  # now: "61 of 66 (92.4%) covered, mean size"
    ]
    for page in PAGES:
        text = page.read_text()
        if page.name not in ("README.md", "index.md"):
            assert not any(p.search(text) for p in stale) or '!!! note "Older printouts"' in text, page.name
            continue
        for pattern in stale:
            assert not pattern.search(text), f"{page.name}: an old printout ({pattern.pattern}): paste today's"
