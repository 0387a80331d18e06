"""`serve-llm --speculative-tokens 4` for real: the flag reaches the engine process, a greedy completion is
the engine's own greedy output without speculation, and /metrics counts the drafts it accepted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .server_proc import ServerProc, start_server

LOOP = [100, 200, 300]  # token ids after which the tiny model repeats itself: lookups find drafts


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(tiny_llama, log, "--speculative-tokens", "4")
    yield srv
    srv.stop()


def test_greedy_completion_with_speculation_is_greedy_decoding(tiny_llama: Path, server: ServerProc) -> None:
    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    got = client.completions.create(model=model, prompt=LOOP, max_tokens=60, temperature=0.0)
    engine = LLMEngine(tiny_llama, EngineConfig(device="cpu"))
    params = SamplingParams(max_tokens=60, temperature=0.0)
    want = engine.generate([EngineRequest("w", tuple(LOOP), params)])["w"][0]
    assert got.choices[0].text == "".join(o.new_text for o in want)
    assert got.usage is not None and got.usage.completion_tokens == want[-1].completion_tokens
    text = httpx.get(server.url + "/metrics").text
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    drafted = samples["inferforge_llm_spec_decode_draft_tokens_total"]
    assert samples["inferforge_llm_spec_decode_accepted_tokens_total"] >= 1 and drafted >= 1
