"""`python -m app.ray`: deploy the service on the Ray cluster at RAY_ADDRESS (or a local one started
here) with Serve's HTTP proxy on SERVE_HTTP_HOST:SERVE_HTTP_PORT, and block until interrupted."""

import logging
import os
import signal
import threading

import ray
from ray import serve

from app.ray.deployments import build_app
from app.settings import Settings

log = logging.getLogger("app.ray")
APP_NAME = "whisper"


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports (and no network) unless asked for
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, namespace="whisper")
    # One proxy, on the head: proxies on several nodes of one machine would fight over the port,
    # and a load balancer in front of several machines can use proxy_location EveryNode instead.
    serve.start(http_options={"host": settings.serve_http_host, "port": settings.serve_http_port}, proxy_location="HeadOnly")
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("serving on http://%s:%d (Ray Serve application %r)", settings.serve_http_host, settings.serve_http_port, APP_NAME)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    # The application stays deployed when this driver exits (Serve's controller owns it);
    # `serve shutdown` or deleting the application removes it.


if __name__ == "__main__":
    main()
