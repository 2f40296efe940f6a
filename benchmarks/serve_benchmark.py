"""serve.py under load beside predict.py, same checkpoint, same images, same run.

    python benchmarks/serve_benchmark.py --ckpt FILE [--inputs FOLDER] [--count 480] [--clients 1 4 16]
                                         [--rss-requests 10000] [--markdown docs/serve-benchmark.md]

predict.py's rate: in-process predict() on the folder (its default decode workers and batch size), timed around
Trainer.predict alone (decode, forward pass, CSV rows; no model load or report), median of --repeats runs.
serve.py's rate: the real server on a free loopback port (max_batch_size 8, as predict.py's CPU batch), N client
threads each with its own connection sending the images in turn as raw bodies until --count requests are done;
throughput and p50/p99 latency per N. Then --rss-requests requests at the largest N while the resident memory of
the server's processes (serve.py, its HTTP and inference workers; summed from /proc) is sampled: the peak of the
first and of the last thousand requests. Every failed request (not 200) is counted.

    python benchmarks/serve_benchmark.py --ckpt FILE --attack 20 [--markdown FILE]

Attack mode (issue 35): a server with a token ($CHESTXRAY_SERVE_TOKEN), 8 good clients sending test images for
--attack seconds alone ("quiet"), then the same 8 beside 2 hostile clients for as long ("under attack"), each
looping over a 10000 x 10000 PNG bomb and a deflated 10000 x 10000 DICOM bomb (with and without the token), garbage,
a 2 MB upload without the token and a slow body (1 kB every 0.5 s, 20 s: most of each loop). With --flood, the 2
loop over the bombs and garbage alone, as fast as the server refuses them, and a third client sends the slow bodies.
The hostile bodies are made before the phases (making a bomb takes seconds of the same CPUs, which the first version
charged to the server). Reports good requests failed, good p50 and p99 of both phases, what the hostile requests
got, and the server's peak resident memory per phase.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = ROOT.parent / "shared" / "data" / "covid19-image-dataset" / "test"
sys.path.insert(0, str(ROOT))


def machine() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return "unknown CPU"


def predict_rate(ckpt: Path, inputs: Path, repeats: int) -> float:
    """predict.py's images/s, in process, timed around Trainer.predict."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from chestxray.inference.predict import predict

    rates = []
    original = L.Trainer.predict

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        timed.seconds = time.perf_counter() - start
        return out

    L.Trainer.predict = timed
    try:
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(
                    "predict",
                    [
                        f"ckpt={ckpt}",
                        f"inputs={inputs}",
                        f"paths.output_dir={tmp}/out",
                        "trainer.accelerator=cpu",
                        "report.bootstrap_resamples=0",
                        "print_limit=0",
                    ],
                )
                summary = predict(cfg)
                rates.append(summary["predicted"] / timed.seconds)
    finally:
        L.Trainer.predict = original
    return statistics.median(rates)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of pid and all its descendants (MB), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def load(url: str, images: list[bytes], clients: int, count: int, on_done=None) -> dict:
    """count requests from `clients` threads; latencies (s), failures, wall time."""
    latencies: list[float] = []
    failures = [0]
    next_index = [0]
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                k = next_index[0]
                if k >= count:
                    return
                next_index[0] += 1
            start = time.perf_counter()
            try:
                ok = session.post(url, data=images[k % len(images)], timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                failures[0] += not ok
                if on_done:
                    on_done(len(latencies))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients,
        "requests": count,
        "failed": failures[0],
        "rate": count / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def start_server(ckpt: Path, out: Path, extra: list[str], headers: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "serve.py",
        f"ckpt={ckpt}",
        f"port={port}",
        f"paths.output_dir={out}",
        "accelerator=cpu",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"serve.py did not start: {proc.stderr.read()[-2000:]}")


def rss_run(url: str, pid: int, images: list[bytes], clients: int, count: int) -> dict:
    """Peak RSS in the first and the last thousand of `count` requests."""
    samples: list[tuple[int, float]] = []
    done = [0]
    stop = threading.Event()

    def sampler() -> None:
        shown = 0
        while not stop.is_set():
            samples.append((done[0], tree_rss_mb(pid)))
            if done[0] >= shown + 1000:  # progress, so that a long run shows its trend as it goes
                shown = done[0] // 1000 * 1000
                print(f"  {done[0]:,} requests: server RSS {samples[-1][1]:.0f} MB", flush=True)
            time.sleep(0.25)

    thread = threading.Thread(target=sampler)
    thread.start()
    result = load(url + "/predict", images, clients, count, on_done=lambda n: done.__setitem__(0, n))
    stop.set()
    thread.join()
    first = max(m for n, m in samples if n <= 1000)
    last = max(m for n, m in samples if n >= count - 1000)
    return {**result, "rss_first_mb": first, "rss_last_mb": last, "rss_peak_mb": max(m for _, m in samples)}


def bombs() -> dict[str, bytes]:
    """A PNG and a deflated DICOM that declare 10000 x 10000 pixels, about 100 and 200 kB on the wire."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    buffer = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buffer, "PNG", optimize=True)
    png = buffer.getvalue()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.ViewPosition, ds.Rows, ds.Columns = "DX", "PA", 10_000, 10_000
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((10_000, 10_000), np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return {"png bomb": png, "dicom bomb": buffer.getvalue()}


def timed_load(url: str, images: list[bytes], clients: int, seconds: float, headers: dict) -> dict:
    """`clients` threads sending images for `seconds`: latencies, failures (not 200)."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(offset: int) -> None:
        session = requests.Session()
        k = offset
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                ok = session.post(url, data=images[k % len(images)], headers=headers, timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                latencies.append(time.perf_counter() - start)
                failures[0] += not ok
            k += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {
        "requests": len(latencies),
        "failed": failures[0],
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def payloads() -> dict[str, bytes]:
    """The hostile bodies, made once before the phases: making a bomb costs seconds of CPU, which would otherwise
    be charged to the server under attack."""
    made = bombs()
    made["garbage"] = os.urandom(50_000)
    made["2 MB"] = os.urandom(2_000_000)
    return made


def hostile(
    url: str,
    token: str,
    bodies: dict[str, bytes],
    stop: threading.Event,
    answers: dict[str, int],
    lock: threading.Lock,
    slow: bool = True,
) -> None:
    """Bombs, garbage and a slow body (1 kB every 0.5 s, 40 kB) in a loop, with and without the token, one request
    at a time, until stopped."""
    good = {"Authorization": f"Bearer {token}"}

    def slow_body():
        for _ in range(40):
            if stop.is_set():
                return
            yield b"\0" * 1000
            time.sleep(0.5)

    attacks = [(name, data, good) for name, data in bodies.items() if name != "2 MB"]
    attacks += [(name + " without token", data, {}) for name, data in bodies.items()]
    if slow:
        attacks.append(("slow body", None, good))
    session, k = requests.Session(), 0
    while not stop.is_set():
        name, data, headers = attacks[k % len(attacks)]
        k += 1
        try:
            status = str(session.post(url, data=slow_body() if data is None else data, headers=headers, timeout=60)
                         .status_code)  # fmt: skip
        except requests.RequestException as err:
            status = type(err).__name__
        with lock:
            key = f"{name}: {status}"
            answers[key] = answers.get(key, 0) + 1


def peak_rss(pid: int, stop: threading.Event, peaks: list[float]) -> None:
    while not stop.is_set():
        peaks.append(tree_rss_mb(pid))
        time.sleep(0.25)


def attack(args, images: list[bytes]) -> str:
    """The quiet and the attacked phase on one server: the table of docs/benchmarks.md's attack section."""
    token = os.urandom(16).hex()
    os.environ["CHESTXRAY_SERVE_TOKEN"] = token  # the server's token, never on its command line
    auth = {"Authorization": f"Bearer {token}"}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.ckpt, Path(tmp) / "serve", args.server_args, auth)
        try:
            timed_load(url + "/predict", images, 8, 3, auth)  # warm-up
            bodies, phases = payloads(), {}
            for name, hostiles in (("quiet", 0), ("under attack", 2)):
                stop, peaks, answers, lock = threading.Event(), [], {}, threading.Lock()
                sampler = threading.Thread(target=peak_rss, args=(proc.pid, stop, peaks))
                kinds = [(bodies, not args.flood)] * hostiles + ([({}, True)] if hostiles and args.flood else [])
                enemies = [
                    threading.Thread(target=hostile, args=(url + "/predict", token, b, stop, answers, lock, slow))
                    for b, slow in kinds
                ]
                for t in [sampler, *enemies]:
                    t.start()
                row = timed_load(url + "/predict", images, 8, args.attack, auth)
                stop.set()
                for t in [sampler, *enemies]:
                    t.join()
                phases[name] = {**row, "rss_peak_mb": max(peaks), "rss_first_mb": peaks[0], "hostile": answers}
                print(name, phases[name], flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    lines = [
        f"Machine: {machine()}. 8 good clients, {args.attack:g} s per phase, one server (token set, defaults)"
        + (", --flood." if args.flood else "."),
        "",
        "| phase | good requests | good failed | good p50 ms | good p99 ms | server RSS start MB | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in phases.items():
        lines.append(
            f"| {name} | {r['requests']} | {r['failed']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['rss_first_mb']:.0f} | {r['rss_peak_mb']:.0f} |"
        )
    quiet, attacked = phases["quiet"], phases["under attack"]
    lines += [
        "",
        f"p99 under attack / quiet: {attacked['p99_ms'] / quiet['p99_ms']:.2f}x. Hostile requests (answer: count): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(attacked["hostile"].items())),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS)
    parser.add_argument("--count", type=int, default=480)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-requests", type=int, default=10_000)
    parser.add_argument("--server-args", nargs="*", default=[])
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables to this file")
    parser.add_argument("--flood", action="store_true", help="attack mode: bombs as fast as refused, slow bodies apart")
    parser.add_argument("--attack", type=float, default=0, help="attack mode: seconds per phase (see the docstring)")
    args = parser.parse_args()

    images = [p.read_bytes() for p in sorted(args.inputs.rglob("*")) if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    if args.attack:
        text = attack(args, images)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return
    baseline = predict_rate(args.ckpt, args.inputs, args.repeats)
    print(f"predict.py: {baseline:.1f} images/s on {len(images)} images", flush=True)
    rows, rss = [], None
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.ckpt, Path(tmp) / "serve", args.server_args)
        try:
            load(url + "/predict", images, 4, 32)  # warm-up: first batches, allocator, connections
            for clients in args.clients:
                row = load(url + "/predict", images, clients, args.count)
                rows.append(row)
                print(row, flush=True)
            if args.rss_requests:
                rss = rss_run(url, proc.pid, images, max(args.clients), args.rss_requests)
                print(rss, flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    text = report(machine(), len(images), baseline, rows, rss)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


def report(cpu: str, n_images: int, baseline: float, rows: list[dict], rss: dict | None) -> str:
    lines = [
        f"Machine: {cpu}. {n_images} test images; predict.py (in process): **{baseline:.1f} images/s**.",
        "",
        "| clients | requests | failed | images/s | vs predict.py | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']:,} | {r['failed']} | {r['rate']:.1f} | {r['rate'] / baseline:.0%} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    if rss:
        lines += [
            "",
            f"{rss['requests']:,} requests at {rss['clients']} clients ({rss['failed']} failed, {rss['rate']:.1f}/s): "
            f"server RSS (all its processes) peak {rss['rss_first_mb']:.0f} MB in the first thousand, "
            f"{rss['rss_last_mb']:.0f} MB in the last thousand, {rss['rss_peak_mb']:.0f} MB over the run.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
