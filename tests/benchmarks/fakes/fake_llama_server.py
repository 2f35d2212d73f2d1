"""A stand-in for llama.cpp's llama-server in CI: /health and /completion, no model.

Answers a token-id prompt with ``n_predict`` tokens when ``ignore_eos`` is set
(as the real server does), after a short sleep so that requests overlap. It
writes its command line to $FAKE_LLAMA_RECORD for tests to check."""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-m", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-np", type=int, default=1)
    p.add_argument("-cb", action="store_true")
    p.add_argument("-c", type=int, default=0)
    p.add_argument("-t", type=int)
    p.add_argument("-tb", type=int)
    p.add_argument("--no-webui", action="store_true")
    args, extra = p.parse_known_args()
    if not os.path.isfile(args.m):
        print(f"no model file {args.m}", file=sys.stderr)
        return 1
    record = os.environ.get("FAKE_LLAMA_RECORD")
    if record:
        with open(record, "w") as f:
            json.dump({"argv": sys.argv[1:], "extra": extra}, f)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._send(200 if self.path == "/health" else 404, {"status": "ok"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["prompt"]
            if self.path != "/completion" or not all(isinstance(t, int) for t in prompt):
                self._send(400, {"error": "token-id prompt expected"})
                return
            if len(prompt) + body["n_predict"] > args.c // args.np:
                self._send(400, {"error": "context of a slot exceeded"})
                return
            time.sleep(float(os.environ.get("FAKE_LLAMA_DELAY", "0.01")))
            n = body["n_predict"] if body.get("ignore_eos") else 1
            self._send(200, {"content": "x" * n, "tokens_predicted": n,
                             "tokens_evaluated": len(prompt)})

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
