"""The original notebook's pipeline against this project's, side by side, on the real dataset.

    python benchmarks/epoch_benchmark.py [--data DIR] [--image-size 224] [--device cpu|cuda]
    python benchmarks/epoch_benchmark.py --isa-compare AVX512_CORE_BF16


Each measurement runs in its own fresh process (so that whole-process time and peak RSS are honest), one after
the other, and the table prints baseline time / our time. Same model (the re-headed VGG19, random weights), same
image size, same train batch size (4), same device: with --device cuda the notebook's loop, the model alone and
our Trainer all run on the GPU (the notebook moves the model and each batch to cuda, as it did), and the table
adds the large-batch recipe (experiment=gpu_fast) and the model alone at that batch, bf16, channels_last.

--isa-compare ISA runs only the epoch rows (the notebook's epoch, ours in fp32 and in bf16-mixed), first with every
instruction set this CPU has, then with oneDNN capped at ISA (its ONEDNN_MAX_CPU_ISA setting, in each child
process): AVX512_CORE_BF16 on a CPU with AMX runs the kernels a CPU with AVX-512 BF16 and no AMX runs, at this
chip's speed for them (another core, a Zen 4's, runs the same instructions at its own), and the table prints the
kernel a bf16 forward convolution ran on under each setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("CHESTXRAY_DATA", str(ROOT.parent / "shared" / "data" / "covid19-image-dataset"))
CLASSES = ["Normal", "Covid", "Viral Pneumonia"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the notebook's pipeline (baseline), written as the notebook does it ---------------------------------


def notebook_dataset(split_dir: Path, size: int):
    import cv2
    import torch
    from torchvision import transforms

    class NotebookDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.files = []
            for name in CLASSES:  # case-sensitive extensions, paths relative to the split folder
                folder = split_dir / name
                self.files += [f"{name}/{f}" for f in os.listdir(folder) if f.split(".")[-1] in ("jpeg", "jpg", "png")]
            self.transform = transforms.Compose(
                [transforms.ToTensor(), transforms.Resize((size, size)), transforms.Normalize([0.5] * 3, [0.5] * 3)]
            )

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            image = cv2.cvtColor(cv2.imread(str(split_dir / self.files[i])), cv2.COLOR_BGR2RGB)
            target = torch.tensor([CLASSES.index(self.files[i].split("/")[0])], dtype=torch.long)
            return {"image": self.transform(image), "target": target}

    return NotebookDataset()


def notebook_loaders(data: Path, size: int):
    from torch.utils.data import DataLoader

    train = DataLoader(notebook_dataset(data / "train", size), batch_size=4, shuffle=True, drop_last=True)
    val = DataLoader(notebook_dataset(data / "test", size), batch_size=1, shuffle=False)
    return train, val


def synchronize(device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def role_baseline_loader(args) -> dict:
    train, _ = notebook_loaders(Path(args.data), args.image_size)
    times = []
    for _ in range(2):  # no cache: the second pass decodes everything again
        start = time.perf_counter()
        n = sum(len(b["image"]) for b in train)
        times.append(time.perf_counter() - start)
    return {"cold_ips": n / times[0], "warm_ips": n / times[1]}


def role_baseline_epoch(args) -> dict:
    import torch

    from chestxray.models.backbones import build_network

    torch.manual_seed(2022)
    device = torch.device(args.device)
    train, val = notebook_loaders(Path(args.data), args.image_size)
    model = build_network("vgg19", 3, pretrained=False).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def accuracy(images, targets):  # the notebook's helper: a second forward pass
        with torch.no_grad():
            return (model(images).argmax(1) == targets).float().mean()

    phases = {}
    for phase, loader in (("train", train), ("val", val)):
        model.train() if phase == "train" else model.eval()
        start, seen = time.perf_counter(), 0
        for batch in loader:
            images, targets = batch["image"].to(device), batch["target"].squeeze(1).to(device)
            optimizer.zero_grad()
            with torch.set_grad_enabled(phase == "train"):
                loss = criterion(model(images), targets)
                if phase == "train":
                    loss.backward()
                    optimizer.step()
            accuracy(images, targets)
            seen += len(images)
        synchronize(device)
        phases[phase] = {"seconds": time.perf_counter() - start, "images": seen}
    return {
        "train_ips": phases["train"]["images"] / phases["train"]["seconds"],
        "val_ips": phases["val"]["images"] / phases["val"]["seconds"],
        "epoch_s": phases["train"]["seconds"] + phases["val"]["seconds"],
    }


# --- this project -------------------------------------------------------------------------------------------


def compose_train(args, *overrides: str):
    from hydra import compose, initialize_config_dir

    common = [
        f"data.data_dir={args.data}",
        f"data.image_size={args.image_size}",
        "model.pretrained=false",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "callbacks.progress_bar.refresh_rate=0",
        "callbacks.run_figures=null",
        f"paths.output_dir={args.out}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*common, *overrides])


def role_ours_loader(args) -> dict:
    from hydra.utils import instantiate

    cfg = compose_train(args, "data.check_leakage=false")
    start = time.perf_counter()
    dm = instantiate(cfg.data)
    dm.setup()  # decodes every image once (train, val and test)
    decode_s = time.perf_counter() - start
    decoded = len(dm.datasets["train"]) + len(dm.datasets["val"]) + len(dm.test_sets["test"])

    def one_pass() -> tuple[int, float]:
        t = time.perf_counter()
        n = sum(len(b[0]) for b in dm.train_dataloader())
        return n, time.perf_counter() - t

    n, first = one_pass()
    warm = [one_pass()[1] for _ in range(5)]
    result = {
        "cold_ips": decoded / (decode_s + first * decoded / n),
        "warm_ips": n / statistics.median(warm),
    }
    batches = [4] if args.device == "cpu" else [4, args.large_batch]
    for batch in batches:
        for channels_last in (False, True):
            for bf16 in (False, True):
                name = f"model_alone_ips_b{batch}_{'cl' if channels_last else 'nchw'}{'_bf16' if bf16 else ''}"
                result[name] = model_alone(args, batch, channels_last, bf16)
    return result


def model_alone(args, batch: int, channels_last: bool, bf16: bool, steps: int | None = None) -> float:
    """The floor: the model alone, input already on the device, an SGD step per batch; images/s."""
    import torch

    from chestxray.models.classifier import ChestXrayClassifier

    device = torch.device(args.device)
    model = ChestXrayClassifier(CLASSES, args.image_size, pretrained=False, channels_last=channels_last).to(device)
    model.optimizer_factory = lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    opt = model.configure_optimizers()
    images = torch.randint(0, 256, (batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    labels = torch.arange(batch, device=device) % 3
    times = []
    for step in range((steps or args.model_steps) + 2):
        synchronize(device)
        t = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        synchronize(device)
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


class PhaseTimer:
    """Wall time of each epoch's train and val phases, from Lightning's hooks."""

    def __new__(cls):
        import lightning as L

        class _Timer(L.Callback):
            def __init__(self):
                self.epochs: list[dict] = []

            def on_train_epoch_start(self, trainer, pl_module):
                self.epochs.append({"start": time.perf_counter()})

            def on_validation_epoch_start(self, trainer, pl_module):
                self.epochs[-1]["val_start"] = time.perf_counter()

            def on_validation_epoch_end(self, trainer, pl_module):
                self.epochs[-1]["val_end"] = time.perf_counter()

        return _Timer()


def run_ours(args, *overrides: str) -> tuple[list[dict], object]:
    from chestxray.training.fit import build

    cfg = compose_train(args, *overrides)
    datamodule, model, trainer = build(cfg)
    timer = PhaseTimer()
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule)
    return timer.epochs, datamodule


def ours_epoch(args, precision: str) -> dict:
    overrides = ["trainer.max_epochs=1", f"model.channels_last={args.channels_last}", f"trainer.precision={precision}"]
    epochs, dm = run_ours(args, *overrides)
    e = epochs[0]
    n_train = len(dm.datasets["train"]) // 4 * 4
    return {
        "train_ips": n_train / (e["val_start"] - e["start"]),
        "val_ips": len(dm.datasets["val"]) / (e["val_end"] - e["val_start"]),
        "epoch_s": e["val_end"] - e["start"],
    }


def role_ours_epoch(args) -> dict:
    return ours_epoch(args, "32-true")


def role_ours_epoch_bf16(args) -> dict:
    """The same epoch in bf16 autocast (trainer.precision=bf16-mixed): oneDNN's AMX kernels on CPUs that have them."""
    return ours_epoch(args, "bf16-mixed")


def role_ours_epoch_large(args) -> dict:
    """experiment=gpu_fast (bf16, channels_last, compiled) at --large-batch; three epochs, the last one timed."""
    batch = args.large_batch  # speed only: the recipe's learning rate is left as it is
    epochs, dm = run_ours(args, "experiment=gpu_fast", f"data.batch_size={batch}", "trainer.max_epochs=3")
    e = epochs[-1]
    n_train = len(dm.datasets["train"]) // batch * batch
    return {
        "train_ips": n_train / (e["val_start"] - e["start"]),
        "val_ips": len(dm.datasets["val"]) / (e["val_end"] - e["val_start"]),
    }


def role_ours_frozen(args) -> dict:
    epochs, _ = run_ours(
        args,
        "trainer.max_epochs=10",
        "model.freeze=features",
        "model.cache_features=true",
        f"model.channels_last={args.channels_last}",
    )
    times = [e["val_end"] - e["start"] for e in epochs]
    return {"first_epoch_s": times[0], "later_epoch_s": statistics.median(times[1:]), "ten_epochs_s": sum(times)}


def cpu_name() -> str:
    """The CPU's model name, its core count, and whether it has AMX (what makes bf16 pay)."""
    import platform

    import torch

    with open("/proc/cpuinfo") as fh:
        model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    amx = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX"
    return f"{model or platform.processor()}, {os.cpu_count()} cores, {amx}"


def role_accuracy(args) -> dict:
    """One training run at --precision and --seed (the recipe of experiment=quickstart on --data), its numbers."""
    from chestxray.training.fit import train

    overrides = [
        "experiment=quickstart",
        "test=true",
        f"seed={args.seed}",
        f"trainer.precision={args.precision}",
        f"trainer.max_epochs={args.accuracy_epochs}",
        "trainer.deterministic=true",
        "report.bootstrap_resamples=0",
        "report.gradcam_tiles=0",
    ]
    cfg = compose_train(args, *overrides)
    train(cfg)
    results = json.loads((Path(args.out) / "results.json").read_text())["metrics"]
    return {k: results[k] for k in ("val/acc_best", "test/acc", "test/acc_leak_free")}


def accuracy_over_seeds(args) -> None:
    """fp32 and bf16-mixed training, the same seeds and data: is the difference within the seeds' spread?"""
    rows = {}
    for precision in ("32-true", "bf16-mixed"):
        for k in range(args.accuracy_seeds):
            seed = args.seed + k
            cmd = [sys.executable, __file__, "--role", "accuracy", "--data", args.data]
            cmd += ["--image-size", str(args.image_size), "--device", args.device, "--seed", str(seed)]
            cmd += ["--precision", precision, "--accuracy-epochs", str(args.accuracy_epochs)]
            cmd += ["--out", str(Path(args.out) / f"accuracy-{precision}-{seed}")]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(proc.stderr[-4000:])
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            rows[(precision, seed)] = {**json.loads(line[len("RESULT ") :]), "process_s": time.perf_counter() - start}
            print(f"  {precision} seed {seed}: {rows[(precision, seed)]}", file=sys.stderr, flush=True)
    print(f"\n{cpu_name()}; {args.image_size} px, experiment=quickstart, {args.accuracy_epochs} epochs\n")
    keys = ["val/acc_best", "test/acc", "test/acc_leak_free", "process_s"]
    print("| precision | seed | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    for (precision, seed), row in rows.items():
        print(f"| {precision} | {seed} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    for precision in ("32-true", "bf16-mixed"):
        cells = []
        for key in keys:
            values = [row[key] for (p, _), row in rows.items() if p == precision]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {precision} | mean ± sd | " + " | ".join(cells) + " |")


ROLES = {
    "baseline-loader": role_baseline_loader,
    "baseline-epoch": role_baseline_epoch,
    "ours-loader": role_ours_loader,
    "ours-epoch": role_ours_epoch,
    "ours-frozen": role_ours_frozen,
    "ours-epoch-bf16": role_ours_epoch_bf16,
    "ours-epoch-large": role_ours_epoch_large,  # --device cuda only
    "accuracy": role_accuracy,  # --accuracy-seeds only
}


def child(args) -> None:
    result = ROLES[args.role](args)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def run_child(args, role: str, isa: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--data", args.data, "--image-size", str(args.image_size)]
    cmd += ["--device", args.device, "--out", str(Path(args.out) / role), "--channels-last", args.channels_last]
    cmd += ["--large-batch", str(args.large_batch), "--model-steps", str(args.model_steps)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=isa_env(isa))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{role} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["process_s"] = wall
    print(f"  {role}{f' (oneDNN at most {isa})' if isa else ''}: {wall:.1f} s", file=sys.stderr, flush=True)
    return result


def isa_env(isa: str | None) -> dict[str, str]:
    """The environment of a child process, with oneDNN capped at `isa` (None: every instruction set the CPU has)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    return env if isa is None else {**env, "ONEDNN_MAX_CPU_ISA": isa}


BF16_CONV_PROBE = """
import torch
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
with torch.autocast("cpu", dtype=torch.bfloat16):
    conv(torch.randn(2, 64, 28, 28))
"""


def bf16_conv_kernel(isa: str | None) -> str:
    """The oneDNN kernel a bf16 convolution runs on under `isa` (from ONEDNN_VERBOSE): proof that the cap took."""
    env = {**isa_env(isa), "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", BF16_CONV_PROBE], capture_output=True, text=True, env=env).stdout
    for line in out.splitlines():  # onednn_verbose,v1,primitive,exec,cpu,convolution,<impl>,...
        fields = line.split(",")
        if len(fields) > 6 and fields[2:6] == ["primitive", "exec", "cpu", "convolution"]:
            return fields[6]
    return "unknown (no oneDNN convolution in the verbose output)"


def isa_compare(args) -> None:
    """The whole-process epoch against the notebook's, fp32 and bf16-mixed, with every ISA and capped at one."""
    settings = [None, args.isa_compare]
    results = {isa: {role: run_child(args, role, isa) for role in EPOCH_ROLES} for isa in settings}
    print(f"\n{cpu_name()}, {args.image_size} px, batch 4, one epoch each in its own process\n")
    head = "| oneDNN instruction sets | bf16 convolution kernel | notebook, s | ours fp32, s | ours bf16-mixed, s |"
    print(head + " fp32 speed-up | bf16-mixed speed-up |\n|---|---|---:|---:|---:|---:|---:|")
    for isa, r in results.items():
        base, fp32, bf16 = (r[role]["process_s"] for role in EPOCH_ROLES)
        print(
            f"| {'all this CPU has' if isa is None else f'at most {isa}'} | {bf16_conv_kernel(isa)} | {base:.1f} | "
            f"{fp32:.1f} | {bf16:.1f} | {base / fp32:.2f}x | **{base / bf16:.2f}x** |"
        )


EPOCH_ROLES = ("baseline-epoch", "ours-epoch", "ours-epoch-bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every pipeline runs")
    parser.add_argument(
        "--large-batch", type=int, default=64, help="--device cuda: batch of experiment=gpu_fast and of the model alone"
    )
    parser.add_argument("--channels-last", default="true")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmark"))
    parser.add_argument("--model-steps", type=int, default=5)
    parser.add_argument("--role", choices=sorted(ROLES))
    parser.add_argument(
        "--accuracy-seeds", type=int, default=0, help="instead: fp32 against bf16-mixed accuracy over this many seeds"
    )
    parser.add_argument("--accuracy-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--isa-compare",
        metavar="ISA",
        help="instead: the epoch rows with every instruction set, then with oneDNN at most ISA (AVX512_CORE_BF16)",
    )
    args = parser.parse_args()
    if args.role:
        return child(args)
    import torch

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"benchmark: {args.data}, {args.image_size} px, device {device_name}", file=sys.stderr)
    if args.accuracy_seeds:
        return accuracy_over_seeds(args)
    print(f"CPU: {cpu_name()}", file=sys.stderr)
    if args.isa_compare:
        return isa_compare(args)
    roles = [r for r in ROLES if (args.device == "cuda" or r != "ours-epoch-large") and r != "accuracy"]
    r = {role: run_child(args, role) for role in roles}
    b_load, b_ep, o_load, o_ep, o_fr = (r[k] for k in roles[:5])
    o_bf = r["ours-epoch-bf16"]
    ten_baseline = 10 * b_ep["epoch_s"]
    rows = [
        ("loader, cold (first epoch), images/s", b_load["cold_ips"], o_load["cold_ips"], "higher"),
        ("loader, warm (later epochs), images/s", b_load["warm_ips"], o_load["warm_ips"], "higher"),
        ("training at batch 4, images/s", b_ep["train_ips"], o_ep["train_ips"], "higher"),
        ("evaluation, images/s", b_ep["val_ips"], o_ep["val_ips"], "higher"),
        ("one epoch (train + validate), s", b_ep["epoch_s"], o_ep["epoch_s"], "lower"),
        ("one epoch as a whole process, s", b_ep["process_s"], o_ep["process_s"], "lower"),
        ("training at batch 4, bf16-mixed, images/s", b_ep["train_ips"], o_bf["train_ips"], "higher"),
        ("one epoch, bf16-mixed (train + validate), s", b_ep["epoch_s"], o_bf["epoch_s"], "lower"),
        ("one epoch as a whole process, bf16-mixed, s", b_ep["process_s"], o_bf["process_s"], "lower"),
        ("freeze=features: first epoch, s", b_ep["epoch_s"], o_fr["first_epoch_s"], "lower"),
        ("freeze=features: a later epoch, s", b_ep["epoch_s"], o_fr["later_epoch_s"], "lower"),
        ("freeze=features: 10 epochs, s (baseline 10 x 1)", ten_baseline, o_fr["ten_epochs_s"], "lower"),
        ("peak RSS of the epoch process, MB", b_ep["peak_rss_mb"], o_ep["peak_rss_mb"], "lower"),
    ]
    print(f"\n{device_name if args.device == 'cuda' else cpu_name()}, {args.image_size} px\n")
    print("| measurement | notebook | chestxray | speed-up (baseline / ours) |\n|---|---:|---:|---:|")
    for name, base, ours, better in rows:
        ratio = base / ours if better == "lower" else ours / base
        print(f"| {name} | {base:.2f} | {ours:.2f} | {ratio:.2f}x |")
    layout = "cl" if args.channels_last == "true" else "nchw"
    floor = o_load[f"model_alone_ips_b4_{layout}"]
    print("\nthe model alone (SGD step, inputs on the device), images/s:")
    for key, value in sorted(o_load.items()):
        if key.startswith("model_alone_ips_"):
            print(f"  {key.removeprefix('model_alone_ips_')}: {value:.1f}")
    share = o_ep["train_ips"] / floor
    print(f"our training at batch 4 reaches {share:.0%} of the model alone (channels_last={args.channels_last})")
    if "ours-epoch-large" in r:
        large = r["ours-epoch-large"]
        alone = o_load[f"model_alone_ips_b{args.large_batch}_cl_bf16"]
        print(
            f"experiment=gpu_fast (batch {args.large_batch}, bf16, channels_last, compiled): "
            f"{large['train_ips']:.0f} train images/s, {large['val_ips']:.0f} val images/s; "
            f"the model alone at that batch, bf16, channels_last (not compiled): {alone:.0f}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
