"""The model repository: layout, version policy, load/unload and truthful states, on real tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inferforge.errors import InferforgeError
from inferforge.serve.engine import Engine, InferRequest, ModelNotFound, ModelNotReady
from inferforge.serve.repository import ModelRepository, ModelState, VersionPolicy

from .tiny import load, write


def _version(root: Path, name: str, version: str, **options: object) -> Path:
    folder = write(root / name / version, **options)
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("latest:1", ["10"]),
        ("latest:2", ["2", "10"]),
        ("specific:1,2", ["1", "2"]),
        ("all", ["1", "2", "10"]),
    ],
)
def test_version_policy_selects_numerically(policy: str, expected: list[str]) -> None:
    assert VersionPolicy.parse(policy).select(["10", "1", "2"]) == expected


@pytest.mark.parametrize("text", ["latest:x", "latest:0", "specific:", "newest"])
def test_bad_policies_are_refused_with_the_fix(text: str) -> None:
    with pytest.raises(InferforgeError, match=r"latest|specific"):
        VersionPolicy.parse(text)


def test_load_serves_the_policy_versions_and_picks_up_new_ones(tmp_path: Path) -> None:
    _version(tmp_path, "m", "1", seed=1)
    _version(tmp_path, "m", "2", seed=2)
    (tmp_path / "not-a-model").mkdir()
    engine = Engine()
    repo = ModelRepository(tmp_path, engine, load, policy=VersionPolicy.parse("latest:1"))
    assert not repo.ready()  # nothing has been loaded yet
    repo.load_all()
    assert repo.ready() and engine.served() == [("m", "2")]
    assert [(s.version, s.state) for s in repo.index()] == [
        ("1", ModelState.UNAVAILABLE),
        ("2", ModelState.READY),
    ]
    _version(tmp_path, "m", "3", seed=3)
    repo.load("m")
    assert engine.served() == [("m", "3")]
    x = {"input": np.ones((1, 8), np.float32)}
    out = engine.submit("m", None, InferRequest("a", x)).result(5)
    np.testing.assert_allclose(
        out.outputs["logits"], load(tmp_path / "m" / "3", version="3").predict(x)["logits"]
    )
    repo.unload("m")
    assert engine.served() == [] and repo.status("m").state is ModelState.UNAVAILABLE
    with pytest.raises(ModelNotReady):
        engine.submit("m", None, InferRequest("b", x))
    engine.shutdown()


def test_a_model_that_fails_to_load_is_reported_and_the_server_not_ready(tmp_path: Path) -> None:
    _version(tmp_path, "good", "1")
    _version(tmp_path, "bad", "1", fail_load=True)
    engine = Engine()
    repo = ModelRepository(tmp_path, engine, load)
    repo.load_all()
    bad = repo.status("bad")
    assert bad.state is ModelState.UNAVAILABLE and "configured to fail" in bad.reason
    assert repo.status("good").state is ModelState.READY
    assert not repo.ready()
    repo.unload("bad")
    assert repo.ready()
    engine.shutdown()


def test_unknown_models_and_versions_are_not_found(tmp_path: Path) -> None:
    _version(tmp_path, "m", "1")
    repo = ModelRepository(tmp_path, Engine(), load)
    for call in (
        lambda: repo.load("nope"),
        lambda: repo.unload("nope"),
        lambda: repo.status("m", "7"),
        lambda: repo.load("../m"),
    ):
        with pytest.raises(ModelNotFound):
            call()


def test_status_of_unknown_names_does_not_walk_the_disk(tmp_path: Path) -> None:
    """Status answers from the last scan; a model copied in later is seen after an index or load, as with
    Triton's explicit model control."""
    _version(tmp_path, "m", "1")
    repo = ModelRepository(tmp_path, Engine(), load)
    repo.load_all()
    _version(tmp_path, "late", "1")
    with pytest.raises(ModelNotFound):
        repo.status("late")
    assert any(s.name == "late" for s in repo.index())
    assert repo.status("late").state is ModelState.UNAVAILABLE
    repo.engine.shutdown()


def test_a_single_artifact_or_run_folder_is_a_repository_of_one(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "mymodel"
    artifact = write(run / "artifact")
    (artifact / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    engine = Engine()
    repo = ModelRepository(run, engine, load)
    assert repo.scan() == {"mymodel": {"1": run}}
    named = ModelRepository(artifact, Engine(), load)
    assert list(named.scan()) == ["mymodel"]
    (artifact / "manifest.json").write_text(json.dumps({"name": "digits"}))
    assert list(ModelRepository(artifact, Engine(), load).scan()) == ["digits"]


def test_one_models_folder_of_versions_is_a_repository_of_that_model(tmp_path: Path) -> None:
    _version(tmp_path, "resnet", "1")
    _version(tmp_path, "resnet", "2")
    repo = ModelRepository(tmp_path / "resnet", Engine(), load)
    assert {name: sorted(v) for name, v in repo.scan().items()} == {"resnet": ["1", "2"]}


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InferforgeError, match="is not a folder"):
        ModelRepository(tmp_path / "missing", Engine(), load)
