"""The Ray engine's driver side without a cluster (mmllm/labelling/ray_engine.py): an actor that dies is
replaced and its batches relabelled by the new one, each batch written once; the run stops with
:class:`Lost` when actors keep dying; the actors get the driver's absolute paths and hub settings.
The same engine against a real cluster: tests/test_label.py."""

from __future__ import annotations

import pytest

from mmllm.labelling.ray_engine import (REPLACEMENTS_PER_ACTOR, Lost, Refused, _Pool, actor_args, actor_env,
                                        cluster_address)


class Died(Exception):
    """Ray's RayActorError, as the fake cluster raises it."""


class Ref:
    def __init__(self, value=None, error: BaseException | None = None, pending: bool = False) -> None:
        self.value, self.error, self.pending = value, error, pending


class Method:
    def __init__(self, fn) -> None:
        self.remote = fn


class Actor:
    """A replica that labels a batch into one record a row, or dies with its first ``dies`` batches."""

    def __init__(self, cluster: "Cluster", loads: bool = True, placed: bool = True) -> None:
        self.cluster, self.dead = cluster, False
        self.ready = Method(lambda: Ref(cluster.refusal, None if loads else Died("killed while loading"),
                                        pending=not placed))
        self.label = Method(self._label)

    def _label(self, batch):
        if self.dead or self.cluster.deaths_left > 0:
            self.cluster.deaths_left -= 0 if self.dead else 1
            self.dead = True
            return Ref(error=Died("The actor died unexpectedly before finishing this task."))
        return Ref(([{"id": row} for row in batch], 0.5, 0.1))


class Cluster:
    """``ray`` as _Pool uses it: wait, get, kill; results come back in submission order."""

    def __init__(self, deaths: int, refusal: str | None = None, loads: bool = True, places: int = 10 ** 6) -> None:
        self.deaths_left, self.refusal, self.loads, self.places, self.started = deaths, refusal, loads, places, 0

    def start(self) -> Actor:
        self.started += 1
        return Actor(self, self.loads, placed=self.started <= self.places)

    def wait(self, refs, num_returns=1, timeout=None):
        ready = [r for r in refs if not r.pending][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, refs):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    def kill(self, actor) -> None:
        actor.dead = True


def _label_all(pool: _Pool, batches: list[list[str]]) -> list[str]:
    written: list[str] = []
    for batch in batches:
        while pool.full():
            written += [r["id"] for r in pool.next_result()[0]]
        pool.submit(batch)
    while pool.busy():
        written += [r["id"] for r in pool.next_result()[0]]
    return written


def test_a_dead_actors_batches_go_to_its_replacement_and_are_written_once(capsys):
    cluster = Cluster(deaths=1)
    pool = _Pool(cluster.start, 2, cluster, Died, None)
    batches = [[f"r{i}", f"r{i}b"] for i in range(9)]
    written = _label_all(pool, batches)
    assert sorted(written) == sorted(row for batch in batches for row in batch)  # each row once
    assert pool.replaced == 1 and cluster.started == 3
    assert "note: a Ray actor died (The actor died unexpectedly before finishing this task.); its batches go to a " \
           f"new one (1 of {2 * REPLACEMENTS_PER_ACTOR} replacements)" in capsys.readouterr().err


def test_actors_that_keep_dying_stop_the_run_and_a_refused_model_is_said_once():
    cluster = Cluster(deaths=10 ** 6)
    pool = _Pool(cluster.start, 2, cluster, Died, None)
    with pytest.raises(Lost, match=rf"Ray actors died {2 * REPLACEMENTS_PER_ACTOR + 1} times \(the last: The actor "):
        _label_all(pool, [["a"], ["b"], ["c"]])
    with pytest.raises(Refused, match="^no such model folder$"):
        _Pool(Cluster(deaths=0, refusal="no such model folder").start, 2, Cluster(0, "no such model folder"), Died,
              None)


def test_the_actors_get_absolute_paths_the_hub_settings_and_ray_address(tmp_path, monkeypatch):
    """They run in the folder their cluster was started in: `--model review/tiny` named nothing there (or a hub
    id, retried online for a minute: HF_HUB_OFFLINE stayed with the driver)."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "schema.yaml").write_text("categories: [a]\n")
    monkeypatch.chdir(tmp_path)
    args = actor_args({"model": "models/tiny", "schema": "schema.yaml", "template": "listing_v1",
                       "class_prior": "uniform", "batch_size": 4})
    assert args == {"model": str(tmp_path / "models" / "tiny"), "schema": str(tmp_path / "schema.yaml"),
                    "template": "listing_v1", "class_prior": "uniform", "batch_size": 4}
    assert actor_args({"model": "Qwen/Qwen2-VL-2B-Instruct"})["model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert actor_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MMLLM_CACHE": "/c", "HOME": "/h",
                      "HUGGINGFACE_HUB_CACHE": "/hub", "PATH": "/bin"}) == {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MMLLM_CACHE": "/c", "HUGGINGFACE_HUB_CACHE": "/hub"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(None) == "10.0.0.1:6379" and cluster_address("10.0.0.2:6379") == "10.0.0.2:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None


def test_an_actor_killed_while_loading_refuses_the_run_and_a_replacement_never_placed_stops_it(monkeypatch, capsys):
    """Both went by as a traceback (the first) or hung without a word (the second: the lost node held the only
    GPU, and Ray keeps the replacement pending while the head answers)."""
    from mmllm.labelling import ray_engine

    with pytest.raises(Refused, match=r"^a Ray actor died while it loaded the model \(killed while loading\); if "
                                      r"memory ran out, give each actor more"):
        cluster = Cluster(deaths=0, loads=False)
        _Pool(cluster.start, 2, cluster, Died, None)
    monkeypatch.setattr(ray_engine, "REPLACEMENT_WAIT_S", 120)
    cluster = Cluster(deaths=1, places=2)  # the two first actors start; no replacement is ever placed
    pool = _Pool(cluster.start, 2, cluster, Died, None)
    with pytest.raises(Lost, match=r"its replacement was not ready in 120 s \(the cluster has no room for it"):
        _label_all(pool, [["a"], ["b"], ["c"]])
    assert "note: waiting for the replacement actor: the cluster may have no room for it" in capsys.readouterr().err
