"""Every setting of the service, read from the environment (or a `.env` file) in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from optim.scheduler.policy import PolicyName


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, description="Port to listen on.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["tiny.en", "base"],
        description="Models loaded at start-up, comma-separated: bundled names (tiny.en, base), "
        "names found in MODELS_DIR, or paths to a .pt checkpoint / CTranslate2 folder / Hugging Face folder.",
    )
    default_model: str = Field("base", description="Model used for `whisper-1` and when a request names none.")
    models_dir: Path = Field(
        Path("models"),
        description="Folder scanned for extra models (NAME.pt checkpoints, CTranslate2 or Hugging Face folders); "
        "served, loaded on first use. distilled/<model>.pt is <model>'s student, served as <model>:distilled.",
    )
    default_variant: str = Field(
        "auto",
        description="Variant used when a request names a model without one (`base` = `base:DEFAULT_VARIANT`); "
        "`auto` is the recommended one for the device (CPU: int8+flash, CUDA: fp16+flash; `flash` is the exact one).",
    )
    variants: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Variants served, comma-separated (default: every valid combination)."
    )
    preload_variants: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="`model:variant` pairs built at start-up and never evicted, comma-separated (e.g. `base:int8+flash`).",
    )
    on_demand_variants: Annotated[list[str], NoDecode] | None = Field(
        None,
        description="Variants a request may have built when it first asks, comma-separated (default: every served one; "
        "empty: none). Others are served only if preloaded or the default; a request for one gets 400.",
    )
    variant_builds_per_minute: int | None = Field(
        6, ge=1, description="Distinct variants built per model per minute at most; past it: 429 + Retry-After (empty: no limit)."
    )
    variant_memory_mb: float = Field(
        1024.0, gt=0, description="Memory budget for built variants (least recently used are dropped past it)."
    )
    variant_idle_ttl_s: float | None = Field(
        1800.0, description="Drop a built variant unused for this long (empty: never)."
    )
    device: str = Field("auto", description="`auto` (CUDA when available, else CPU), `cpu` or `cuda`.")
    batch_lanes: int | None = Field(
        None, ge=1, description="Batches of one model run at once, each on its own thread (default: 2 on a CPU with 2 cores or more, else 1)."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Threads torch uses inside one call (default: the cores shared between the lanes on CPU, all cores on GPU)."
    )
    max_upload_mb: float = Field(25.0, gt=0, description="Largest accepted upload, in MiB (OpenAI's limit is 25).")
    max_audio_seconds: float = Field(1800.0, gt=0, description="Longest accepted audio, in seconds.")
    max_pending_audio_seconds: float = Field(
        3600.0,
        gt=0,
        description="Decoded audio held at once across all requests, in seconds (about 96 KB each); past it: 503 + Retry-After. "
        "At least MAX_AUDIO_SECONDS.",
    )
    max_batch_size: int = Field(8, ge=1, description="Windows (≤30 s each) decoded together; 1 turns batching off.")
    batch_max_wait_ms: float = Field(
        50.0, ge=0, description="Longest a window waits for others before a partial batch runs, in milliseconds."
    )
    max_batch_audio_seconds: float = Field(
        240.0, gt=0, description="Padded audio per batch (windows × longest window), in seconds: bounds batch memory."
    )
    max_queue: int = Field(64, ge=1, description="Requests admitted at once (waiting or running); past it: 503 + Retry-After.")
    batch_policy: PolicyName = Field(
        "duration", description="`duration`: batch windows of similar length; `fifo`: in arrival order (baseline)."
    )
    dynamic_audio_context: bool = Field(
        True, description="Run the encoder over each window's own length (rounded up to 5 s, at least 15 s) instead of 30 s."
    )
    silence_peak: float = Field(
        1e-3, ge=0, description="Audio whose peak amplitude is below this is silence: empty text, no model call."
    )
    max_prompt_chars: int = Field(
        4096, ge=1, description="Longest accepted `prompt`, in characters (only its last 223 tokens condition the model)."
    )
    shutdown_drain_s: float = Field(
        5.0, ge=0, description="On SIGTERM: seconds /ready answers 503 and new requests get 503 before the listener closes."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds in-flight requests may take to finish; past it they get 503."
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this long.")
    request_read_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for the next piece of a request (headers or body) from the client."
    )
    log_level: str = Field("info", description="Log level of the server.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="API keys, comma-separated: when any key is configured (here or in API_KEYS_FILE), every /v1 "
        "request needs `Authorization: Bearer <key>`.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys, one per line (blank lines and lines starting with # are ignored)."
    )
    metrics_require_key: bool = Field(False, description="/metrics needs an API key too (when keys are configured).")
    max_realtime_sessions: int = Field(
        16, ge=0, description="Realtime WebSocket sessions (GET /v1/realtime) open at once; past it a new one gets an "
        "`error` event (`session_limit_reached`) and is closed with code 1013 (try again later)."
    )
    realtime_idle_timeout_s: float = Field(
        60.0, gt=0, description="A realtime session with no client event for this long is closed (code 1000, reason `idle timeout`)."
    )
    realtime_max_turn_s: float = Field(
        30.0, gt=0, le=300, description="Longest realtime turn: with server_vad a turn is committed when it reaches this much "
        "audio (speech going on continues in a new item); without turn detection an append past it is refused "
        "(`input_audio_buffer_full`) until the client commits or clears."
    )
    realtime_interim_ms: float = Field(
        1000.0, ge=0, description="While a realtime turn is spoken, re-decode it every this many milliseconds of new audio "
        "and send the words two decodes agree on as transcription deltas (0: no interim decodes, only completed)."
    )

    # Ray Serve (python -m app.ray, app/ray/): not RAY_-prefixed, Ray reads RAY_* variables itself.
    serve_min_replicas: int = Field(1, ge=1, description="Ray mode: fewest replicas per served model (equal to the maximum: a fixed count).")
    serve_max_replicas: int = Field(1, ge=1, description="Ray mode: most replicas per served model (autoscaling above the minimum).")
    serve_target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ray mode: requests in flight per model replica the autoscaler aims for (MAX_BATCH_SIZE keeps batches full)."
    )
    serve_replica_cpus: float = Field(
        1.0, gt=0, description="Ray mode: CPUs reserved per model replica (TORCH_THREADS defaults to this, rounded, at least 1)."
    )
    serve_max_queued_requests: int = Field(
        64, ge=1, description="Ray mode: requests waiting in Serve for a model replica; past it: 503 + Retry-After."
    )
    serve_request_timeout_s: float = Field(
        900.0, gt=0, description="Ray mode: longest wait for a model replica's answer; past it: 503 + Retry-After (bounds any lost call)."
    )
    serve_ingress_replicas: int = Field(1, ge=1, description="Ray mode: replicas of the HTTP ingress (no weights, parsing and decoding).")
    serve_http_host: str = Field("127.0.0.1", description="Ray mode: address Serve's HTTP proxy listens on.")
    serve_http_port: int = Field(8000, description="Ray mode: port Serve's HTTP proxy listens on.")

    @field_validator("models", "variants", "preload_variants", "api_keys", "on_demand_variants", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @model_validator(mode="after")
    def _default_is_served(self) -> "Settings":
        if not self.models:
            raise ValueError("MODELS must name at least one model")
        if self.serve_max_replicas < self.serve_min_replicas:
            raise ValueError("SERVE_MAX_REPLICAS must be at least SERVE_MIN_REPLICAS")
        if self.max_pending_audio_seconds < self.max_audio_seconds:
            raise ValueError("MAX_PENDING_AUDIO_SECONDS must be at least MAX_AUDIO_SECONDS: one request of the longest audio must fit")
        return self

    @field_validator("variant_idle_ttl_s", "api_keys_file", "variant_builds_per_minute", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
