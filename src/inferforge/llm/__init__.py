"""The decoder-LLM engine: Hugging Face folders in, streams of `protocol.EngineOutput` out.

Public faces: `llm.engine.LLMEngine` (synchronous `step()`), `llm.async_engine.AsyncLLMEngine` (the
`protocol.EngineClient` a server uses), `llm.engine.EngineConfig`, and `llm.tiny.make_tiny_llama` for tests.
Nothing is imported here, so `import inferforge.llm` stays cheap; no web framework is imported anywhere below.
"""
