"""The server's speculative option: greedy completions equal the plain server's, acceptance recorded."""

from __future__ import annotations

import openai

from tilemem.engine.llm import LLM
from tilemem.server import BackgroundServer, ServerConfig

PROMPTS = ["a b a b a b a", "def f(x):\n    return x", "hello hello hello"]


def completions(llm: LLM) -> list[str]:
    config = ServerConfig(port=0, max_batch=4, max_queue=8, log_level="warning")
    with BackgroundServer(llm, config) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        return [
            client.completions.create(model="ckpt", prompt=p, max_tokens=16, temperature=0).choices[0].text
            for p in PROMPTS
        ]


def test_speculative_server_matches_plain_server(make_ckpt):
    path = make_ckpt("olmoe")
    plain = completions(LLM(path, dtype="fp32", max_batch=4))
    spec_llm = LLM(path, dtype="fp32", max_batch=4, speculative="ngram", num_draft=3)
    assert completions(spec_llm) == plain
