"""A test-only stage plugin (loaded through KILN_STAGE_PLUGINS): writes a file in two halves with a
pause in between, so a test can SIGKILL a worker in the middle of a stage. The label ``slowconvert``
(seconds per progress report) slows the real convert stage the same way (the compiler still writes
its own temp directory), so a test can kill a worker mid-convert."""

import time

from service.workers import stages
from service.workers.pipeline import STAGES, Stage, register_stage


def slow_stage(ctx, input_dir, output_dir, cfg, progress):
    output_dir.mkdir(parents=True)
    with open(output_dir / "payload.bin", "wb") as f:
        f.write(b"a" * 4096)
        f.flush()
        steps = max(1, int(cfg["seconds"] / 0.1))
        for i in range(steps):
            time.sleep(0.1)
            progress((i + 1) / steps, f"step {i + 1}/{steps}")
        f.write(b"b" * 4096)
    return {"bytes": 8192}


register_stage(Stage("slow", slow_stage, config=lambda s: {"seconds": float(s.labels["slow"])} if "slow" in s.labels else None),
               after="convert")


def _slow_convert(ctx, input_dir, output_dir, cfg, progress):
    pause = float(ctx.spec.labels.get("slowconvert", 0))

    def slowed(frac, message):
        progress(frac, message)
        time.sleep(pause)

    return stages.convert_stage(ctx, input_dir, output_dir, cfg, slowed if pause else progress)


_convert = next(s for s in STAGES if s.name == "convert")
register_stage(Stage("convert", _slow_convert, config=_convert.config, artifact=_convert.artifact,
                     weight=_convert.weight))  # replaces it in place: same name, same key config


class StageRefused(Exception):
    """A permanent stage failure (its code is in the pipeline's PERMANENT_CODES): the job fails at once."""

    code = "invalid_checkpoint"

    def __init__(self, message: str):
        super().__init__(message)
        self.message, self.hint = message, "the test asked this stage to fail (label fail=<message>)"


def failing_stage(ctx, input_dir, output_dir, cfg, progress):
    raise StageRefused(cfg["message"])


# a job labelled fail=<message> fails after convert: a failed job with no report artifact
register_stage(Stage("fail", failing_stage, config=lambda s: {"message": s.labels["fail"]} if "fail" in s.labels else None),
               after="convert")
