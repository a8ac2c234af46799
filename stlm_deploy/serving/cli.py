"""``stlm-serve``: serve an engine directory through a real Triton Inference Server (:mod:`stlm_deploy.serving.server`).

    stlm-serve ENGINE_DIR [--name NAME] [--backend auto|ort|openvino|tensorrt] [--precision P]
               [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
               [--max-batch N] [--max-queue-delay-us 2000] [--instances 1] [--no-dynamic-batching]

Loads the Detector (the engine's ``backend="auto"`` rule unless --backend says otherwise), starts
tritonserver, waits until the model answers ``/v2/models/NAME/ready`` and prints one line with the
HTTP, gRPC and metrics addresses; Ctrl-C stops it cleanly. Errors: one line, exit 1 (2: usage or the
``serve`` extra missing).
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from ..console import CommandError, OneLineCommand, require_extra, runtime_options
from ..images import DEFAULT_MAX_PIXELS
from ..spec import display_path

__all__ = ["main"]


@click.command(name="stlm-serve", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engine", metavar="ENGINE_DIR")
@click.option("--name", default=None, help="Model name on the server (default: the engine's name).")
@runtime_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the server on every interface).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Triton max_batch_size (default: the engine's fixed batch, else 8).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Dynamic batching: how long a request may wait for others to form a batch.")
@click.option("--no-dynamic-batching", is_flag=True, help="Run every request on its own.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (concurrent executions, one Detector shared).")
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse image_bytes items with more pixels (from the header); 0 = no cap.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds to wait for the model to become ready.")
@click.option("--no-verify", is_flag=True, help="Skip the artifact checksum verification.")
@click.option("-v", "--verbose", is_flag=True, help="Log backend selection and Triton's own log.")
def main(engine: str, name: str | None, backend: str, precision: str | None, threads: int | None, host: str,
         http_port: int, grpc_port: int, metrics_port: int, max_batch: int | None, max_queue_delay_us: int,
         no_dynamic_batching: bool, instances: int, max_pixels: int, ready_timeout: float, no_verify: bool,
         verbose: bool) -> None:
    """Serve an exported STLM engine on a Triton Inference Server (KServe V2, HTTP + gRPC)."""
    require_extra("stlm-serve", "serve")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("pytriton").setLevel(logging.ERROR)
    from ..detector import Detector
    from .server import ServeOptions, StlmServer

    try:
        det = Detector.load(engine, backend=backend, precision=precision, threads=threads, verify=not no_verify,
                            batch_size=max_batch, max_pixels=max_pixels)
    except OSError as e:
        raise CommandError(f"{engine}: {e.strerror or e}") from None
    opts = ServeOptions(name=name, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances,
                        dynamic_batching=not no_dynamic_batching, ready_timeout_s=ready_timeout,
                        max_pixels=max_pixels or None, log_verbose=1 if verbose else 0)
    server = StlmServer(det, opts)

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Both set explicitly: a process started in the background of a script inherits SIGINT ignored,
    # and Python then keeps ignoring it, so Ctrl-C / kill -INT would never stop the server.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        server.start()
        info = det.info()
        click.echo(f"stlm-serve: model '{server.name}' ready ({display_path(det.artifact)} on {info['backend']}, "
                   f"{info['precision'] or 'default'}, {info['device']}; max_batch {server.max_batch}, dynamic "
                   f"batching {'off' if no_dynamic_batching else f'{max_queue_delay_us} us'}, {instances} instance(s)) "
                   f"http {server.http_url} grpc {server.grpc_url} metrics http://{host}:{metrics_port}/metrics",
                   err=True)
        server.serve_forever()
        raise CommandError("stlm-serve: the Triton server exited unexpectedly")
    except KeyboardInterrupt:
        click.echo("stlm-serve: stopping", err=True)
    finally:
        server.stop()
        det.close()


if __name__ == "__main__":
    main(prog_name="stlm-serve")
