"""A stub vLLM server for the tests: /v1/models and /v1/completions in vLLM's documented response
format, with REAL log-probs from the model it is given (tiny-qwen2, or a run's base + adapter), so
a client of it must score exactly what the local backend scores."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

SERVED = ("Qwen/Qwen2.5-0.5B-Instruct", "reranker")  # base model + the --lora-modules name


class StubVLLM:
    """/v1/models and /v1/completions in vLLM's response format. `mode` injects a fault. Choices are
    answered in reverse order, so a client that maps them by position rather than `index` fails."""

    def __init__(self, model, tok) -> None:
        self.model, self.tok = model, tok
        self.bodies: list[dict] = []
        self.mode = "ok"
        self._forward = threading.Lock()  # one forward at a time: the client sends chunks concurrently
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": SERVED[0],
                         "parent": None if m == SERVED[0] else SERVED[0], "max_model_len": 2048} for m in SERVED]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                status, answer = stub.complete(body)
                self._send(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Handler threads are joined by close(): a daemon one still inside a torch forward when the
        # interpreter exits (the "slow" mode outlives its client's timeout) aborts pytest at shutdown
        # ("terminate called without an active exception").
        self.server.daemon_threads = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def complete(self, body: dict) -> tuple[int, dict]:
        if self.mode == "500":
            return 500, {"error": {"message": "CUDA out of memory.\nTried to allocate 2.00 GiB", "type": "InternalServerError", "param": None, "code": 500}}
        if self.mode == "400-old":  # older vLLM error body: message at the top level
            return 400, {"object": "error", "message": "This model's maximum context length is 2048 tokens.", "type": "BadRequestError", "param": None, "code": 400}
        if self.mode == "slow":
            time.sleep(1.5)
        if body["model"] not in SERVED:
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}}
        wanted = [] if self.mode == "old-vllm" else body.get("logprob_token_ids", [])  # an old vLLM ignores the field
        choices = []
        for i, ids in enumerate(body["prompt"]):
            with self._forward, torch.no_grad():
                logp = self.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
            greedy = int(logp.argmax())  # temperature 0
            top = {f"token_id:{greedy}": logp[greedy].item(), **{f"token_id:{t}": logp[t].item() for t in wanted}}
            if self.mode == "drop-id":
                top.pop(f"token_id:{wanted[-1]}", None)
            choices.append({
                "index": i, "text": self.tok.decode([greedy]), "finish_reason": "length", "stop_reason": None,
                "logprobs": {"text_offset": [0], "token_logprobs": [logp[greedy].item()],
                             "tokens": [f"token_id:{greedy}"], "top_logprobs": [top]},
            })
        if self.mode == "drop-choice":
            choices = choices[:-1]
        n_prompt = sum(len(p) for p in body["prompt"])
        return 200, {"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                     "choices": choices[::-1],
                     "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(choices), "total_tokens": n_prompt + len(choices)}}
