"""`python -m app`: run the service with uvicorn on HOST:PORT."""

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from app.limits import http_protocol
from app.main import create_app
from app.settings import Settings
from app.shutdown import Shutdown


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM starting the app's drain (app/shutdown.py) instead of closing the
    listener at once. A second signal, or SIGINT, stops at once as uvicorn does. The signal is
    not re-raised after the shutdown, so a drained exit is exit status 0."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown):
        super().__init__(config)
        self.drain = shutdown
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.draining and self.loop is not None:
            self.loop.call_soon_threadsafe(self.drain.begin, self._stop_listening)
            return
        if self.drain.draining:  # a second signal: stop now
            self.force_exit = True
        super().handle_exit(sig, frame)

    def _stop_listening(self) -> None:
        self.should_exit = True  # uvicorn closes the listener, then waits for in-flight requests


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        http=http_protocol(settings.request_read_timeout_s),
        # a backstop only: the app answers what is left at SHUTDOWN_TIMEOUT_S itself
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 5,
    )
    DrainingServer(config, app.state.shutdown).run()


if __name__ == "__main__":
    main()
