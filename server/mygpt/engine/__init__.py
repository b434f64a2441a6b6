"""The generation engine: token ids in, token events out.

It knows token ids, sampling parameters and (later) adapter names; nothing of HTTP, pydantic,
tenants or keys. One thread owns the model; callers talk to it through `Engine.submit`/`abort`
or the asyncio wrapper `AsyncEngine.generate`.
"""
