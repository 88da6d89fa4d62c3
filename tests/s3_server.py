"""moto's S3 API as a server process of its own on loopback, for the S3 store's tests:

    python tests/s3_server.py [--port N]     prints "listening on <port>" once it accepts connections

It is moto's standalone server (`moto_server`) with one difference: requests are handled one at a time.
moto checks a conditional write's precondition and then writes, in two steps, so two concurrent
`If-None-Match: *` puts of one key could both succeed under `moto_server`'s threads; AWS S3 and MinIO decide
them atomically. One request at a time gives the S3 semantics the store relies on (docs/deploy.md lists
what else moto does not do like S3). State is in memory: a killed server comes back empty.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args()

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    # threaded=False: one request at a time (and HTTP/1.0, so no idle keep-alive connection blocks others).
    server = make_server("127.0.0.1", args.port, DomainDispatcherApplication(create_backend_app),
                         threaded=False, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
