"""Helper threads run torch on themselves alone (mmllm.openmp): a helper's own OpenMP team would slow
every small operation of the model in the main thread (#16). The labeller's preparing workers do so."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mmllm.labelling.engine as engine
from mmllm.label import main
from mmllm.openmp import single_thread_team

from listings import small_schema, write_catalog

OPENMP = sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def test_a_helper_thread_gets_a_team_of_one_and_the_main_thread_keeps_its_own():
    main_threads = torch.get_num_threads()

    def helper() -> tuple[bool, int, int]:
        before = torch.get_num_threads()
        done = single_thread_team()
        torch.randn(64, 64) @ torch.randn(64, 64)  # a kernel runs: one thread, no team
        return done, before, torch.get_num_threads()

    with ThreadPoolExecutor(1) as pool:
        done, before, after = pool.submit(helper).result()
    assert torch.get_num_threads() == main_threads  # the main thread's count is untouched
    if not OPENMP:  # no OpenMP runtime to ask: nothing changed anywhere
        assert not done and after == before
        return
    assert done and after == 1
    with ThreadPoolExecutor(1) as pool:  # a thread that never asked keeps the process's count
        assert pool.submit(torch.get_num_threads).result() == before


@pytest.mark.skipif(not OPENMP, reason="torch without OpenMP (the workers' count cannot be set per thread)")
def test_the_labellers_preparing_workers_run_single_threaded(tmp_path, tiny_checkpoint, monkeypatch):
    path = write_catalog(tmp_path, n=4)
    small_schema().to_yaml(tmp_path / "schema.yaml")
    seen: list[int] = []
    original = engine.prepare

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare", spy)
    out = tmp_path / "out.jsonl"
    assert main([str(path), "--model", str(tiny_checkpoint("qwen2_vl")), "--schema", str(tmp_path / "schema.yaml"),
                 "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4", "--no-constrained", "--quiet"]) == 0
    assert seen == [1, 1] and len(out.read_text().splitlines()) == 4


class Encoding:
    """A predictor whose encode records the torch threads it gets (light or not, as declared)."""

    schema, max_images, batch_size = None, 0, 2

    def __init__(self, light: bool) -> None:
        self.light_encode, self.threads = light, []

    def encode(self, listings, images):
        self.threads.append(torch.get_num_threads())
        return listings

    def predict_encoded(self, encoded, raw=False):
        return [{"category": None, "attributes": {}, "status": "ok"} for _ in encoded]


@pytest.mark.skipif(not OPENMP, reason="torch without OpenMP (the workers' count cannot be set per thread)")
def test_workers_that_run_encoders_keep_the_processs_threads(tmp_path):
    from mmllm.labelling.engine import LabelOptions, run_local
    from mmllm.labelling.output import Output

    path = write_catalog(tmp_path, n=4)
    for light, want in ((True, 1), (False, torch.get_num_threads())):
        predictor, out = Encoding(light), tmp_path / f"out-{light}.jsonl"
        with Output(out, None, resume=False, inputs=[path]) as output:
            summary = run_local(predictor, [path], output, LabelOptions(batch_size=2, quiet=True,
                                                                        roots={path.name: path.parent}))
        assert summary.ok == 4 and predictor.threads == [want, want]
