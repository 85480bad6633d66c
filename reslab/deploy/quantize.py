"""Post-training int8 quantization with ONNX Runtime, calibrated on real images.

Static QDQ quantization: int8 per-channel weights, uint8 activations whose ranges come from
running real images through the fp32 model. Whether int8 is *faster* depends on the CPU (AVX2
without VNNI gains little): :func:`quantize_report` measures accuracy and speed side by side so
the user can choose.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reslab.data import Placement, build_data, checkpoint_data, fixed_batches
from reslab.deploy.export import export_model, ort_session
from reslab.deploy.inputs import real_inputs
from reslab.engine import EvalStats, read_checkpoint
from reslab.engine.timing import latency, time_calls
from reslab.errors import ReslabError
from reslab.weights import guard_output


def quantize_onnx(fp32: Path, int8: Path, calibration: torch.Tensor, batch: int = 16) -> Path:
    """Write an int8 QDQ model of ``fp32`` to ``int8``, calibrated on ``calibration`` inputs."""
    # onnxruntime's quantization tools: loaded only when quantizing (a deployment dependency)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort_session(fp32).get_inputs()[0].name
    chunks = [calibration[i : i + batch].numpy() for i in range(0, len(calibration), batch)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(chunks)

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.it, None)
            return None if chunk is None else {name: chunk}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return int8


def onnx_accuracy(path: Path, loader) -> dict[str, Any]:
    """Top-1/top-5 error of an ONNX model over a reslab evaluation loader."""
    session = ort_session(path)
    name = session.get_inputs()[0].name
    stats = EvalStats(torch.device("cpu"))
    preds = []
    for x, y in loader:
        out = torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
        stats.add(out, y.cpu())
        preds.append(out.argmax(1))
    result = stats.result()
    result["predictions"] = torch.cat(preds)
    return result


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
    """Export fp32 ONNX, quantize to int8 on real calibration images, and compare accuracy on the
    checkpoint's real test set and speed at batch 1 and 8 (``min_time`` seconds per measurement)."""
    ckpt = read_checkpoint(checkpoint, model)
    pre = ckpt.preprocess
    int8 = Path(out) if out else Path(checkpoint).with_suffix(".int8.onnx")
    fp32 = int8.with_name(
        int8.name.replace(".int8", "") if ".int8" in int8.name else int8.stem + ".fp32.onnx"
    )
    for path in (int8, fp32):
        guard_output(path, "ONNX model", inputs=(checkpoint,), overwrite=overwrite)
    loader = None
    if (ckpt.config or {}).get("data"):
        cfg, seed = checkpoint_data(ckpt.config, augment="none", batch_size=64, eval_batch_size=256)
        data = build_data(
            cfg, place=Placement(seed=seed), channels=pre.channels, preprocess=pre, progress=False
        )
        loader = data.eval
        if calib is None:  # calibrate on training images, never on the test set
            batches = fixed_batches(ckpt.config, pre, split="train", limit=calib_n)
            calibration = torch.cat([x for x, _ in batches])[:calib_n]
    if calib is not None:
        calibration = real_inputs(ckpt, calib, calib_n)  # read once: each unreadable file is named once
    elif loader is None:
        raise ReslabError(
            f"{checkpoint}: no record of its data; pass --calib DIR with real calibration images"
        )
    export_model(ckpt, "onnx", fp32, fold_bn=True, verify_inputs=calibration[:16], overwrite=overwrite)
    quantize_onnx(fp32, int8, calibration)
    report: dict[str, Any] = {"fp32": str(fp32), "int8": str(int8), "calibration_images": len(calibration)}
    if loader is not None:
        a, b = onnx_accuracy(fp32, loader), onnx_accuracy(int8, loader)
        report.update(
            test_images=a["n"],
            fp32_top1_err=a["err"],
            int8_top1_err=b["err"],
            top1_agreement=(a["predictions"] == b["predictions"]).float().mean().item(),
        )
    shape_tail = (pre.channels, *pre.size)
    for bs in (1, 8):
        for tag, path in (("fp32", fp32), ("int8", int8)):
            report[f"{tag}_b{bs}"] = onnx_latency(path, (bs, *shape_tail), min_time)
        report[f"int8_speedup_b{bs}"] = (
            report[f"int8_b{bs}"]["img_per_s"] / report[f"fp32_b{bs}"]["img_per_s"]
        )
    report["bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    return report
