"""`lmmrt serve`: an OpenAI-compatible server over a continuous-batching engine.

lmmrt.serve.engine runs the model (slotted KV cache, scheduler thread, media cache); the HTTP side
(app, schemas, chat templates, metrics) builds on its Engine / EngineRequest / RequestHandle.
"""

from lmmrt.serve.engine import Engine
from lmmrt.serve.requests import Delta, EngineClosed, EngineRequest, Finished, QueueFull, RequestHandle

__all__ = ["Delta", "Engine", "EngineClosed", "EngineRequest", "Finished", "QueueFull", "RequestHandle"]
