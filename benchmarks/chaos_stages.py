"""Stage plugins for ``benchmarks/chaos.py`` (loaded through ``KILN_STAGE_PLUGINS``): a poison stage and a
pause stage.

A job labelled ``poison=worker`` crashes its whole worker (SIGKILL of the worker's process group: the
Celery main process and its pool child) every time it reaches this stage; ``poison=child`` kills only
the pool process running it. Jobs without the label never plan the stage (their keys are unchanged). A job labelled
``chaos-pause=<seconds>`` spends that long in a ``pause`` stage after convert (progress every 0.1 s, so a
cancellation or a lost lease is seen), which keeps it reliably mid-job while a scenario strikes.
"""

from __future__ import annotations

import os
import signal
import time

from service.workers.pipeline import Stage, register_stage


def poison_stage(ctx, input_dir, output_dir, cfg, progress):
    progress(0.5, f"poison: killing the {cfg['poison']}")
    if cfg["poison"] == "worker":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
    return {}  # never reached


register_stage(Stage("poison", poison_stage, weight=0.1,
                     config=lambda s: {"poison": s.labels["poison"]} if s.labels.get("poison") in ("worker", "child")
                     else None), after="convert")


def pause_stage(ctx, input_dir, output_dir, cfg, progress):
    output_dir.mkdir(parents=True)
    steps = max(1, int(cfg["seconds"] / 0.1))
    for i in range(steps):
        time.sleep(0.1)
        progress((i + 1) / steps, f"pausing {i + 1}/{steps}")
    (output_dir / "paused.txt").write_text(f"{cfg['seconds']}\n")
    return {"seconds": cfg["seconds"]}


register_stage(Stage("pause", pause_stage, weight=0.1,
                     config=lambda s: {"seconds": float(s.labels["chaos-pause"])} if "chaos-pause" in s.labels
                     else None), after="convert")
