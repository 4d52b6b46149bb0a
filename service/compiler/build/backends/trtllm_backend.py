"""The ``trtllm`` backend: TensorRT-LLM's own ``trtllm-build`` run on Kiln's checkpoint.

Kiln writes the TensorRT-LLM checkpoint format, so this backend only maps BuildConfig onto
``trtllm-build``'s documented options and runs it. It is imported only where ``import tensorrt_llm``
works and a GPU is present (see ``..capabilities``); elsewhere it is reported unavailable, never run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ...errors import KilnError
from ..config import ResolvedBuild


class TrtllmBuildFailed(KilnError):
    code = "trtllm_build_failed"


def trtllm_build_command(ckpt_dir: Path, resolved: ResolvedBuild, out_dir: Path) -> list[str]:
    bc = resolved.config
    exe = shutil.which("trtllm-build")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorrt_llm.commands.build"]
    return cmd + [
        "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out_dir),
        "--max_batch_size", str(bc.max_batch_size), "--max_input_len", str(bc.max_input_len),
        "--max_seq_len", str(bc.max_seq_len), "--max_num_tokens", str(bc.max_num_tokens),
        "--kv_cache_type", bc.kv_cache_type, "--gemm_plugin", "auto",
    ]


def build_trtllm_engine(ckpt_dir: Path, resolved: ResolvedBuild, out_dir: Path, *, progress=None) -> dict:
    import tensorrt_llm  # only reached where capabilities() found it importable

    start = time.perf_counter()
    proc = subprocess.run(trtllm_build_command(ckpt_dir, resolved, out_dir), capture_output=True, text=True)
    if proc.returncode != 0:
        raise TrtllmBuildFailed(f"trtllm-build failed (exit {proc.returncode}): {proc.stderr[-4000:]}")
    stats = {"build_seconds": round(time.perf_counter() - start, 3), "tensorrt_llm_version": tensorrt_llm.__version__}
    cfg_path = out_dir / "config.json"  # trtllm-build writes {version, pretrained_config, build_config}
    cfg = json.loads(cfg_path.read_text())
    cfg["kiln"] = {"backend": "trtllm", "build_stats": stats}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return stats
