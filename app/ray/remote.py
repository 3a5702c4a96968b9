"""The ingress's side of a model replica call: a scheduler with the local `Scheduler`'s interface
(transcribe, retry_after, abort, close, and what app.metrics reads) that sends each request to
its model's deployment, and maps Ray's failures onto error kinds (app/errors.py gives the status)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from optim.errors import Kind, ServiceError
from optim.models import ModelStore
from optim.scheduler import SchedulerConfig
from optim.types import ModelRef, Timing, Transcript, TranscriptionOptions

# Serve restarts a dead replica in a few seconds (its model loads in about one for tiny.en, a few for base).
REPLICA_RETRY_AFTER_S = 5
REPLICA_GONE = (RayActorError, ActorDiedError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


class ReplicaOverloaded(ServiceError):
    """Serve refused the request: every replica of the model is at SERVE_MAX_QUEUED_REQUESTS."""

    kind = Kind.OVERLOADED
    code = "server_overloaded"


class ReplicaFailed(ServiceError):
    """The replica holding the request died (or stopped answering) before it answered: the request
    was not completed, and sending it again is safe (a transcription has no side effects)."""

    kind = Kind.OVERLOADED
    code = "replica_unavailable"


@dataclass(frozen=True)
class Failure:
    """A ServiceError crossing the process boundary as plain fields: the library's errors take
    their own constructor arguments (QueueFull(retry_after), PromptTooLong(length, limit)), so
    pickling the exception itself (Exception's reduce: the class called on its message) does
    not rebuild them."""

    cls: type[ServiceError]
    message: str
    param: str | None
    retry_after: int | None

    @classmethod
    def of(cls, error: ServiceError) -> "Failure":
        return cls(type(error), error.message, error.param, error.retry_after)

    def error(self) -> ServiceError:
        error = self.cls.__new__(self.cls)
        ServiceError.__init__(error, self.message, self.param, self.retry_after)
        return error


def deployment_name(model_id: str) -> str:
    """One deployment per served model: requests for a model reach only replicas that hold it."""
    return "whisper_" + "".join(c if c.isalnum() else "_" for c in model_id)


class RemoteScheduler:
    def __init__(self, handles: dict[str, DeploymentHandle], timeout_s: float, config: SchedulerConfig):
        self.handles = handles  # model id -> its deployment
        self.config = config  # the replicas' batching limits (app/realtime.py sizes its interim decodes by them)
        self.timeout_s = timeout_s
        self._admitted = 0
        self._seconds = 1.0  # running mean of a request's time on a replica: Retry-After
        self._live: set[asyncio.Future] = set()  # one per request in flight: abort fails them
        self._refusal: Exception | None = None

    # What app.metrics reads: the windows wait in the replicas, which export their own queues.
    def waiting_windows(self) -> dict[str, int]:
        return {}

    @property
    def queued_windows(self) -> int:
        return 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds))

    def abort(self, error: Exception) -> int:
        self._refusal = error
        live = [f for f in self._live if not f.done()]
        for future in live:
            future.set_exception(error)
        return len(live)

    async def close(self) -> None:
        pass  # nothing runs here; the replicas belong to Serve

    async def transcribe(
        self,
        ref: ModelRef,
        samples: np.ndarray,
        options: TranscriptionOptions,
        on_text: Callable[[str], None] | None = None,
        on_queued: Callable[[], None] | None = None,
    ) -> tuple[Transcript, Timing]:
        if self._refusal is not None:
            raise self._refusal
        handle = self.handles[ref.model]  # resolve_model let through served models only
        aborted = asyncio.get_running_loop().create_future()
        self._admitted += 1
        self._live.add(aborted)
        start = time.perf_counter()
        call = asyncio.ensure_future(self._call(handle, ref, samples, options, on_text, on_queued))
        try:
            done, _ = await asyncio.wait({call, aborted}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise ReplicaFailed(
                    f"model {ref.model!r}: no answer from its replica in {self.timeout_s:.0f} s (SERVE_REQUEST_TIMEOUT_S); retry",
                    None, REPLICA_RETRY_AFTER_S,
                )
            if aborted in done:
                aborted.result()  # raises the abort's error
            result = call.result()
            self._seconds = 0.9 * self._seconds + 0.1 * (time.perf_counter() - start)
            return result
        finally:
            call.cancel()  # a cancelled request (client gone, timeout) cancels its replica call too
            self._live.discard(aborted)
            self._admitted -= 1

    async def _call(self, handle, ref, samples, options, on_text, on_queued) -> tuple[Transcript, Timing]:
        try:
            if on_text is None:
                answer = await handle.transcribe.remote(ref, samples, options)
            else:  # streamed: the replica yields "queued", the text pieces, then the answer
                answer = None
                async for kind, value in handle.options(stream=True).transcribe_stream.remote(ref, samples, options):
                    if kind == "queued" and on_queued is not None:
                        on_queued()
                    elif kind == "text":
                        on_text(value)
                    else:
                        answer = value
        except BackPressureError as e:
            raise ReplicaOverloaded(
                f"model {ref.model!r}: every replica is at its queue limit (SERVE_MAX_QUEUED_REQUESTS); retry in {self.retry_after()} s",
                None, self.retry_after(),
            ) from e
        except REPLICA_GONE as e:
            raise ReplicaFailed(
                f"model {ref.model!r}: the replica serving this request stopped before it answered; it is being restarted, "
                f"retry in {REPLICA_RETRY_AFTER_S} s",
                None, REPLICA_RETRY_AFTER_S,
            ) from e
        except RayTaskError as e:  # an exception the replica did not turn into a Failure
            if isinstance(e.cause, ServiceError):
                raise e.cause from None
            if isinstance(e.cause, REPLICA_GONE):
                raise ReplicaFailed(f"model {ref.model!r}: its replica is unavailable; retry", None, REPLICA_RETRY_AFTER_S) from e
            raise
        if isinstance(answer, Failure):
            raise answer.error()
        return answer


class IngressModels(ModelStore):
    """The ingress's store: resolves names (resolve_model, /v1/models) and loads nothing; /ready
    reports the model deployments, as the last readiness poll saw them (`replicas`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replicas: dict[str, bool] = {}  # model id -> a ready replica answered the last poll

    @property
    def ready(self) -> bool:
        return bool(self.replicas) and all(self.replicas.get(m, False) for m in self.sources)

    def readiness(self) -> dict:
        models = {m: "ready" if self.replicas.get(m) else "no ready replica" for m in self.sources}
        return {"status": "ready" if self.ready else "loading", "models": models, "variants": {}, "load_seconds": {}, "errors": {}}
