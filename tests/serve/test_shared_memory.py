"""The system shared-memory extension through `tritonclient` against the real server: tensors in /dev/shm."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from .conftest import Server, make_repo, start_server
from .tiny import TinyServable


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("shm")
    server = start_server(make_repo(tmp / "repo"), tmp, "--enable-shared-memory", "--version-policy", "all")
    yield server
    server.stop()


@pytest.fixture
def regions() -> Iterator[tuple[object, object, str]]:
    tag = uuid.uuid4().hex[:8]
    inp = shm.create_shared_memory_region(f"in-{tag}", f"/if_in_{tag}", 3 * 8 * 4)
    out = shm.create_shared_memory_region(f"out-{tag}", f"/if_out_{tag}", 4096)
    yield inp, out, tag
    shm.destroy_shared_memory_region(inp)
    shm.destroy_shared_memory_region(out)


def _status(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call()
    return f"{info.value.status()} {info.value.message()}"


def test_inputs_and_outputs_through_shared_memory_equal_the_model(shm_server: Server, regions) -> None:  # type: ignore[no-untyped-def]
    inp, out, tag = regions
    client = httpclient.InferenceServerClient(shm_server.address)
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    shm.set_shared_memory_region(inp, [x])
    client.register_system_shared_memory(f"in-{tag}", f"/if_in_{tag}", x.nbytes)
    client.register_system_shared_memory(f"out-{tag}", f"/if_out_{tag}", 4096)
    names = {r["name"] for r in client.get_system_shared_memory_status()}
    assert {f"in-{tag}", f"out-{tag}"} <= names
    tensor = httpclient.InferInput("input", [3, 8], "FP32")
    tensor.set_shared_memory(f"in-{tag}", x.nbytes)
    wanted = httpclient.InferRequestedOutput("logits", binary_data=True)
    wanted.set_shared_memory(f"out-{tag}", 3 * 4 * 4, offset=64)
    result = client.infer("tiny", [tensor], model_version="1", outputs=[wanted])
    expected = TinyServable("tiny", "1", seed=1).predict({"input": x})["logits"]
    got = shm.get_contents_as_numpy(out, np.float32, list(expected.shape), offset=64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert result.get_output("logits")["parameters"]["shared_memory_byte_size"] == expected.nbytes
    client.unregister_system_shared_memory(f"in-{tag}")
    assert f"in-{tag}" not in {r["name"] for r in client.get_system_shared_memory_status()}
    assert "not registered" in _status(lambda: client.infer("tiny", [tensor], model_version="1"))
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_bad_regions_get_clear_400s(shm_server: Server, regions) -> None:  # type: ignore[no-untyped-def]
    _, _, tag = regions
    client = httpclient.InferenceServerClient(shm_server.address)
    register = client.register_system_shared_memory
    assert _status(lambda: register("r", "/../etc/passwd", 8)).startswith("400")
    assert _status(lambda: register("r", f"/if_missing_{tag}", 8)).startswith("400")
    assert "runs past" in _status(lambda: register("r", f"/if_in_{tag}", 10_000))
    register(f"in-{tag}", f"/if_in_{tag}", 96)
    assert "already registered" in _status(lambda: register(f"in-{tag}", f"/if_in_{tag}", 96))
    tensor = httpclient.InferInput("input", [3, 8], "FP32")
    tensor.set_shared_memory(f"in-{tag}", 95)  # one byte short of the shape
    assert "needs 96" in _status(lambda: client.infer("tiny", [tensor], model_version="1"))
    tensor.set_shared_memory(f"in-{tag}", 96, offset=8)  # past the region's end
    assert "do not fit" in _status(lambda: client.infer("tiny", [tensor], model_version="1"))
    client.unregister_system_shared_memory()


def test_the_extension_is_off_by_default(open_server: Server) -> None:
    client = httpclient.InferenceServerClient(open_server.address)
    assert "system_shared_memory" not in client.get_server_metadata()["extensions"]
    assert _status(client.get_system_shared_memory_status).startswith("403")
    tensor = httpclient.InferInput("input", [1, 8], "FP32")
    tensor.set_shared_memory("anything", 32)
    assert "--enable-shared-memory" in _status(lambda: client.infer("tiny", [tensor]))


def test_it_cannot_be_combined_with_several_http_workers(tmp_path: Path) -> None:
    from inferforge.errors import InferforgeError
    from inferforge.serve.server import ServerConfig

    make_repo(tmp_path / "repo")
    with pytest.raises(InferforgeError, match="--enable-shared-memory"):
        ServerConfig(str(tmp_path / "repo"), http_workers=2, enable_shared_memory=True)
