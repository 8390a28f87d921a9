"""`serve()`: `ddpmkit serve`'s entry point. It starts the page of a `Studio` on host:port and stops on SIGINT
or SIGTERM within seconds, a running job included (it stops at its next step)."""
from __future__ import annotations

import gc
import logging
import os
import signal
import threading

from ddpmkit.errors import UserError
from ddpmkit.serve.jobs import QUEUE_SIZE, Studio
from ddpmkit.serve.page import CSS, NO_GRADIO, build_app, has_gradio, import_gradio
from ddpmkit.serve.request import MAX_UPLOAD_MB

logger = logging.getLogger(__name__)


def serve(model: str | None = None, models_dir: str | os.PathLike | None = None, host: str = "127.0.0.1",
          port: int = 7860, share: bool = False, device: str | None = None) -> int:
    """Start the app on host:port and block until SIGINT or SIGTERM; then stop the running job and the server.

    `device`: where jobs sample (None or 'auto': a CUDA GPU when there is one; see `Studio`)."""
    if not has_gradio():
        raise UserError(NO_GRADIO)  # before any model is read: the one thing to install
    studio = Studio(model, models_dir, device=device)
    gr = import_gradio()
    app = build_app(studio)
    app.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                       show_error=True, max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=[str(studio.output_dir)],
                       enable_monitoring=False, ssr_mode=False, mcp_server=False, pwa=False, run_history=False,
                       footer_links=["api"], css=CSS,
                       theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"]))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({str(err).splitlines()[0]}): give another --port") \
                from None
        logger.info("ddpmkit serve: http://%s:%s%s (Ctrl-C stops it)", host, app.server_port,
                    f", public link {app.share_url}" if share and app.share_url else "")
        # Everything loaded so far lives until exit: keep it out of the collector's scans, which makes the
        # interpreter's last collection at exit ~6x shorter (it was most of the time a stop took).
        gc.freeze()
        stop.wait()
    finally:
        for sig, handler in previous.items():  # a second signal stops at once
            signal.signal(sig, handler)
    logger.info("stopping")
    studio.stopping.set()
    app.close()
    studio.close()
    return 0
