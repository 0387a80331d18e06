"""OpenAI-compatible HTTP server for the LLM engine (`inferforge serve-llm`).

The app talks to the engine only through `inferforge.llm.protocol.EngineClient`; importing this package
pulls in no web framework until `create_app` or the server is used.
"""
