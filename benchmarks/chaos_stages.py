"""Stage plugin for ``benchmarks/chaos.py`` (loaded through ``KILN_STAGE_PLUGINS``): a poison stage.

A job labelled ``poison=worker`` crashes its whole worker (SIGKILL of the worker's process group: the
Celery main process and its pool child) every time it reaches this stage; ``poison=child`` kills only
the pool process running it. Jobs without the label never plan the stage (their keys are unchanged).
"""

from __future__ import annotations

import os
import signal

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
