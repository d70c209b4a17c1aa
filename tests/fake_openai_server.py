"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the triplet generator's tests.

`FakeOpenAIServer(script)` serves POST /v1/chat/completions in a background thread. For every
request it reads the caption and the counts out of the prompt (training/triplets/llm.py's
USER_PROMPT), records the request, and answers what `script(caption, attempt)` returns (`attempt`
counts this caption's requests from 0). The default script answers valid JSON.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CAPTION = re.compile(r'Image caption: "(.*)"\n')
_COUNTS = re.compile(r"Write (\d+) paraphrase\(s\) and (\d+) negation\(s\)")


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # the assistant message; None = a valid answer for the request
    body: bytes | None = None  # raw response body, overrides `content`
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (ends early when the server stops)
    hold: threading.Event | None = None  # answer only once this is set (or the server stops)


def valid_content(caption: str, paraphrases: int, negations: int) -> str:
    """What a well-behaved model answers: texts that are recognisably derived from the caption."""
    return json.dumps({"paraphrases": [f"In other words {i}: {caption}" for i in range(paraphrases)],
                       "negations": [f"It is false ({i}) that {caption}" for i in range(negations)]})


class FakeOpenAIServer:
    def __init__(self, script: Callable[[str, int], Reply] | None = None) -> None:
        self.script = script or (lambda caption, attempt: Reply())
        self.requests: list[dict] = []  # {"caption", "attempt", "authorization", "body"}
        self.asked: Counter = Counter()  # caption -> requests received
        self.answered: Counter = Counter()  # caption -> responses fully sent
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                prompt = body["messages"][-1]["content"]
                caption = _CAPTION.search(prompt).group(1)
                paraphrases, negations = (int(x) for x in _COUNTS.search(prompt).groups())
                with server.lock:
                    attempt = server.asked[caption]
                    server.asked[caption] += 1
                    server.requests.append({"caption": caption, "attempt": attempt, "body": body,
                                            "authorization": self.headers.get("Authorization"),
                                            "path": self.path})
                reply = server.script(caption, attempt)
                if reply.hold is not None:
                    while not reply.hold.wait(0.05) and not server.stopping.is_set():
                        pass
                if reply.delay:
                    server.stopping.wait(reply.delay)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    reply = Reply(status=404, body=b'{"error": "no such route"}')
                content = reply.content if reply.content is not None else valid_content(caption, paraphrases,
                                                                                         negations)
                payload = reply.body if reply.body is not None else json.dumps(
                    {"id": "fake", "object": "chat.completion",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}).encode("utf-8")
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (timeout or killed): nothing was answered
                with server.lock:
                    server.answered[caption] += 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
