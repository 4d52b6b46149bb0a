"""`kiln watch` / `kiln submit --watch` / `kiln compile`'s job bar: elapsed, ETA, rank label, name tails."""

from __future__ import annotations

from service.api.cli import _Bar


def _job(state, progress, message="", stage="convert"):
    return {"id": "j1", "state": state, "progress": progress, "stage": stage, "message": message}


def test_job_bar_shows_elapsed_eta_and_the_rank_being_written(capsys):
    bar = _Bar()
    ticks = iter([0.0, 1.0, 4.0, 9.0])  # the bar's clock at construction and at each show()
    bar.clock = lambda: next(ticks)
    bar.start = bar.clock()
    bar.show(_job("running", 0.1, "rank 0/2 transformer.vocab_embedding.weight"))
    bar.show(_job("running", 0.4, "rank 1/2 transformer.layers.12.attention.qkv.weight"))
    bar.show(_job("succeeded", 1.0, "done"), final=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert "rank 0/2 transformer.vocab_embedding.weight" in lines[0] and "ETA" not in lines[0]
    # 0.3 of the job in 3 s since progress was first seen: 0.6 left takes 6 s
    assert " 40.0% 4.0s ETA 6.0s convert rank 1/2 transformer.layers.12.attention.qkv.weight" in lines[1]
    assert lines[2].startswith("succeeded [") and "100.0% 9.0s" in lines[2] and "ETA" not in lines[2]


def test_job_bar_repeats_nothing_when_only_the_clock_moved(capsys):
    bar = _Bar()
    for _ in range(3):
        bar.show(_job("running", 0.5, "writing"))
    assert len(capsys.readouterr().err.splitlines()) == 1
