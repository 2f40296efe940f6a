"""Chest X-ray classification (Normal / Covid / Viral Pneumonia): torchvision backbones under a small head,
Lightning and Hydra."""

import time

from omegaconf import OmegaConf

__version__ = "0.3.0"
# When this process started its work (train.py and predict.py import the package before Hydra sets up a run
# folder): a refused run removes only what it made after this.
STARTED = time.time()


def _run_dir(resume, base):
    from chestxray.runtime.folders import run_dir

    return run_dir(resume, base)


def _hydra_subdir(resume, output_dir):
    from chestxray.runtime.folders import hydra_subdir

    return hydra_subdir(resume, output_dir)


def _new_folder(base):
    from chestxray.runtime.folders import new_folder

    return new_folder(base)


# /proc/cpuinfo flags of CPUs that compute bf16 natively: AMX tiles (Intel Sapphire Rapids and later) or AVX-512
# BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later), which oneDNN's bf16 kernels use
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# A marker of a Sapphire Rapids-class Intel core (AVX512-FP16; neither Zen 4 nor Cooper Lake has it), not the
# cause of the slowness: where such a core shows no AMX (a kernel or a hypervisor that hides it), oneDNN runs bf16
# on its AVX-512 BF16 kernels, at 0.61x the fp32 epoch's speed (measured by capping oneDNN at that instruction set
# on such a core, docs/benchmarks.md): fp32 is the fast path there.
SLOW_AVX512_BF16_CORE = "avx512_fp16"


def cpu_precision(cpuinfo: str = "/proc/cpuinfo") -> str:
    """trainer=cpu's precision: bf16-mixed with AMX (measured: 6.17x the notebook's epoch, 3.5x fp32 at 224 px, the
    same accuracy within the spread of seeds, docs/benchmarks.md) and with AVX-512 BF16 without AMX on a core without
    AVX512-FP16 (AMD Zen 4: 2.0x fp32 per training step in issue 36's measurement; Intel Cooper Lake: not measured,
    bf16 by the same rule); 32-true on a Sapphire Rapids-class core that shows no AMX (SLOW_AVX512_BF16_CORE: bf16
    measured slower than fp32 there) and where bf16 would be emulated (an AVX2-only CPU such as an older AMD EPYC:
    autocast there only adds conversions)."""
    try:
        with open(cpuinfo) as fh:
            flags = set(next((line for line in fh if line.startswith("flags")), "").split())
    except OSError:
        return "32-true"
    amx, avx512_bf16 = NATIVE_BF16_FLAGS
    if amx in flags or (avx512_bf16 in flags and SLOW_AVX512_BF16_CORE not in flags):
        return "bf16-mixed"
    return "32-true"


def auto_precision(accelerator: str = "auto", cpuinfo: str = "/proc/cpuinfo") -> str:
    """The default trainer's precision: on the CPU (accelerator=cpu, or auto on a machine without a CUDA GPU) what
    trainer=cpu uses (cpu_precision), so that plain `python train.py` gets the CPU's fast path; 32-true on a GPU
    (trainer=gpu's fp32 with TF32; experiment=gpu_fast is the bf16 recipe)."""
    if accelerator == "cpu":
        return cpu_precision(cpuinfo)
    if accelerator == "auto":
        import torch

        return "32-true" if torch.cuda.is_available() else cpu_precision(cpuinfo)
    return "32-true"


def _mlflow_artifacts(tracking_uri):
    """A local MLflow store keeps its artifacts in outputs/mlartifacts; a tracking server decides for itself."""
    return None if str(tracking_uri).startswith(("http://", "https://", "databricks")) else "outputs/mlartifacts"


# Used by the configs, so registered on import. The run folders are created when Hydra resolves them (cached, so
# once per run): python train.py resume=RUN_DIR runs in RUN_DIR itself and leaves its .hydra/ folder to
# chestxray.training.resume (which writes the merged settings there).
OmegaConf.register_new_resolver("chestxray.run_dir", _run_dir, replace=True, use_cache=True)
OmegaConf.register_new_resolver("chestxray.new_folder", _new_folder, replace=True, use_cache=True)
OmegaConf.register_new_resolver("chestxray.hydra_subdir", _hydra_subdir, replace=True)
OmegaConf.register_new_resolver("chestxray.mlflow_artifacts", _mlflow_artifacts, replace=True)
OmegaConf.register_new_resolver("chestxray.cpu_precision", cpu_precision, replace=True)
OmegaConf.register_new_resolver("chestxray.auto_precision", auto_precision, replace=True)
