#!/usr/bin/env python3
"""A backend that really holds GPU memory, for deploy/gpu-check.sh.

Allocates --fraction of the GPU's total memory as one CUDA tensor (touched, so it is resident),
then serves a minimal OpenAI-compatible HTTP API (GET /health, GET /v1/models, POST
/v1/chat/completions) on --port. It refuses to start (exit 1, "CUDA out of memory") when the
memory is not free: two of these on one GPU with --fraction above one half cannot run together,
so a swap that starts the next one before the last one's memory is released fails visibly.
On SIGTERM it exits at once; the driver frees the memory while the process is torn down.
"""

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--fraction", type=float, default=0.6)
    args = parser.parse_args()

    free, total = torch.cuda.mem_get_info()
    want = int(total * args.fraction)
    print(
        f"{args.name}: GPU free {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; "
        f"allocating {want / 2**30:.1f} GiB",
        flush=True,
    )
    started = time.monotonic()
    try:
        hog = torch.empty(want, dtype=torch.uint8, device="cuda")
        hog.fill_(1)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:
        print(f"{args.name}: CUDA out of memory: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(
        f"{args.name}: holding {hog.numel() / 2**30:.1f} GiB "
        f"(allocated in {time.monotonic() - started:.2f} s)",
        flush=True,
    )

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self.answer(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self.answer(200, {"object": "list", "data": [{"id": args.name, "object": "model"}]})
            else:
                self.answer(404, {"error": {"message": "not found", "type": "not_found", "code": 404}})

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            text = f"[served by {args.name}] holding {hog.numel() / 2**30:.1f} GiB"
            self.answer(
                200,
                {
                    "object": "chat.completion",
                    "model": args.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"{args.name}: serving on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
