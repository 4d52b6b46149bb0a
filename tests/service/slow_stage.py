"""A test-only stage plugin (loaded through KILN_STAGE_PLUGINS): writes a file in two halves with a
pause in between, so a test can SIGKILL a worker in the middle of a stage."""

import time

from service.workers.pipeline import Stage, register_stage


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
