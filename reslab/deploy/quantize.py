"""int8 that keeps its accuracy: calibration on real images, and the accuracy of exported files
on the checkpoint's real test split beside the fp32 model's.

Both int8 paths are static with per-channel weights: PT2E with the XNNPACK quantizer for
ExecuTorch, ONNX Runtime's QDQ quantizer for ONNX (:func:`reslab.deploy.onnx.quantize_onnx`).
Activation ranges are observed on a few hundred of the run's own training images, never on the
test split. Whether int8 is *faster* depends on the CPU (AVX2 without VNNI gains little):
:func:`quantize_report` measures accuracy and speed side by side so the user can choose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reslab.data import Placement, build_data, checkpoint_data, fixed_batches
from reslab.deploy.export import default_output, export_model, runner
from reslab.deploy.inputs import real_inputs
from reslab.deploy.onnx import ort_session
from reslab.engine import Checkpoint, EvalStats, read_checkpoint
from reslab.engine.timing import latency, time_calls
from reslab.errors import ReslabError
from reslab.weights import guard_output


def calibration_images(ckpt: Checkpoint, calib: str | None = None, n: int = 256) -> torch.Tensor:
    """``n`` real images to observe activation ranges on: from ``calib`` (a folder), else a
    stratified sample of the training images the checkpoint was trained on."""
    if calib is not None:
        return real_inputs(ckpt, calib, n)  # read once: each unreadable file is named once
    if not (ckpt.config or {}).get("data"):
        raise ReslabError(
            f"{ckpt.path}: no record of its data; pass --calib DIR with real calibration images"
        )
    batches = fixed_batches(ckpt.config, ckpt.preprocess, split="train", limit=n)
    return torch.cat([x for x, _ in batches])[:n]


def test_loader(ckpt: Checkpoint, limit: int | None = None, batch: int = 256):
    """The checkpoint's real test split (or held-out validation split), preprocessed as it says;
    None when the checkpoint records no data."""
    if not (ckpt.config or {}).get("data"):
        return None
    cfg, seed = checkpoint_data(ckpt.config, augment="none", eval_batch_size=batch, limit_test=limit)
    pre = ckpt.preprocess
    data = build_data(cfg, place=Placement(seed=seed), channels=pre.channels, preprocess=pre, progress=False)
    return data.eval


@torch.no_grad()
def accuracy(run: Callable[[torch.Tensor], torch.Tensor], loader) -> dict[str, Any]:
    """Top-1/top-5 error of a model (any callable on input batches) over an evaluation loader, and
    its top-1 predictions."""
    stats = EvalStats(torch.device("cpu"))
    preds = []
    for x, y in loader:
        out = run(x.cpu()).float()
        stats.add(out, y.cpu())
        preds.append(out.argmax(1))
    result = stats.result()
    result["predictions"] = torch.cat(preds)
    return result


def compare_on_test(ckpt: Checkpoint, files: dict[str, tuple[Path, str]], limit: int | None = None) -> dict:
    """The fp32 PyTorch model and each exported file (name -> (path, format)) on the real test split:
    top-1 error and top-1 agreement with fp32. Empty when the checkpoint records no data."""
    loader = test_loader(ckpt, limit)
    if loader is None:
        return {}
    model = ckpt.model.cpu().float().eval()
    fp32 = accuracy(model, loader)
    out = {"test_images": fp32["n"], "split": "test", "pytorch-fp32": {"top1_err": fp32["err"]}}
    for name, (path, fmt) in files.items():
        result = accuracy(runner(path, fmt), loader)
        agreement = (result["predictions"] == fp32["predictions"]).float().mean().item()
        out[name] = {"top1_err": result["err"], "top1_agreement_with_fp32": agreement}
    return out


def onnx_latency(path: Path, shape: tuple[int, ...], min_time: float = 1.5) -> dict[str, float]:
    """p50/p90 latency and throughput of an ONNX model on random inputs of ``shape``."""
    session = ort_session(path)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    return latency(time_calls(lambda: session.run(None, feed), min_time), shape[0])


def quantize_report(
    checkpoint: str,
    out: str | None = None,
    calib: str | None = None,
    calib_n: int = 256,
    model: str | None = None,
    min_time: float = 1.5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export fp32 and int8 ONNX (static, per-channel, calibrated on real images) and compare their
    accuracy on the checkpoint's real test split and their speed at batch 1 and 8 (``min_time``
    seconds per measurement)."""
    ckpt = read_checkpoint(checkpoint, model, device="cpu")
    int8 = Path(out or default_output(checkpoint, ".int8.onnx"))
    fp32 = int8.with_name(
        int8.name.replace(".int8", "") if ".int8" in int8.name else int8.stem + ".fp32.onnx"
    )
    for path in (int8, fp32):
        guard_output(path, "ONNX model", inputs=(checkpoint,), overwrite=overwrite)
    calibration = calibration_images(ckpt, calib, calib_n)
    verify = calibration[:16]
    export_model(ckpt, "onnx", fp32, fold_bn=True, verify_inputs=verify, overwrite=overwrite)
    export_model(
        ckpt, "onnx", int8, fold_bn=True, verify_inputs=verify, quantize="int8", calibration=calibration,
        overwrite=overwrite,
    )  # fmt: skip
    report: dict[str, Any] = {"fp32": str(fp32), "int8": str(int8), "calibration_images": len(calibration)}
    compared = compare_on_test(ckpt, {"fp32": (fp32, "onnx"), "int8": (int8, "onnx")})
    if compared:
        report.update(
            test_images=compared["test_images"],
            fp32_top1_err=compared["fp32"]["top1_err"],
            int8_top1_err=compared["int8"]["top1_err"],
            top1_agreement=compared["int8"]["top1_agreement_with_fp32"],
        )
    shape_tail = (ckpt.preprocess.channels, *ckpt.preprocess.size)
    for bs in (1, 8):
        for tag, path in (("fp32", fp32), ("int8", int8)):
            report[f"{tag}_b{bs}"] = onnx_latency(path, (bs, *shape_tail), min_time)
        report[f"int8_speedup_b{bs}"] = (
            report[f"int8_b{bs}"]["img_per_s"] / report[f"fp32_b{bs}"]["img_per_s"]
        )
    report["bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    return report
