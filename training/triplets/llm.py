"""The LLM triplet generator: any OpenAI-compatible chat-completions server (vLLM, llama.cpp's server,
Ollama, hosted APIs), standard library only.

One request per caption: POST {base_url}/chat/completions asking for a JSON object
`{"paraphrases": [...], "negations": [...]}`. Every answer is validated (JSON, counts, non-empty,
different from the caption: validate.py); invalid answers, HTTP 429 and 5xx, timeouts and dropped
connections are retried, at most `max_retries` times per caption, waiting `Retry-After` when the server
sends it, else an exponential backoff with jitter. 401/403/404 mean every request would fail the same
way: they raise FatalLLMError, which stops the run (answers received so far stay in the cache).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .validate import select_texts

PROMPT_VERSION = 1  # part of the cache key: changing the prompt must not reuse old answers

SYSTEM_PROMPT = ("You write training data for an image-text model. You answer with a single JSON object "
                 "and nothing else.")

USER_PROMPT = """Image caption: "{caption}"

Write {n} paraphrase(s) and {m} negation(s) of this caption.
- A paraphrase says exactly the same thing about the image in other words (reorder, rephrase, use \
synonyms). It stays true for the image and adds or drops no detail.
- A negation is a minimal edit that makes the caption false for the image: add or remove a negation \
("not", "no"), or change one attribute, object, number, relation or action, or swap two of them. Keep \
the rest of the wording.
- Every text is one sentence, different from the caption and from the other texts.
Answer with exactly this JSON object: {{"paraphrases": [{n} string(s)], "negations": [{m} string(s)]}}"""

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUSES = {401: "unauthorized (is OPENAI_API_KEY set and valid?)", 403: "forbidden",
                  404: "not found (is --base-url right? it usually ends in /v1)"}


class FatalLLMError(RuntimeError):
    """An error every further request would repeat (bad URL, bad key): the run stops."""


class InvalidAnswer(ValueError):
    pass


@dataclass(frozen=True)
class LLMSettings:
    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    timeout: float = 60.0  # seconds per request (connect and each read)
    max_retries: int = 4  # retries per caption after the first attempt
    backoff: float = 1.0  # first backoff in seconds; doubles every retry
    max_wait: float = 60.0  # cap on any single wait, Retry-After included
    json_mode: bool = True  # send response_format={"type": "json_object"}

    def cache_settings(self, paraphrases: int, negations: int) -> dict[str, object]:
        """What shapes an answer (the server's URL and key do not: the same model elsewhere answers alike)."""
        return {"generator": "llm", "model": self.model, "temperature": self.temperature,
                "paraphrases": paraphrases, "negations": negations, "prompt": PROMPT_VERSION}


@dataclass
class Outcome:
    paraphrases: list[str]
    negations: list[str]
    error: str | None  # None on success; else why the caption failed, after every retry
    attempts: int


@dataclass
class Stats:
    """Counts over all requests, thread-safe."""

    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.counts[name] += amount


def build_messages(caption: str, paraphrases: int, negations: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(caption=caption, n=paraphrases, m=negations)}]


_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)


def parse_answer(body: bytes, caption: str, paraphrases: int, negations: int) -> tuple[list[str], list[str]]:
    """The validated texts of a chat-completions response body, or InvalidAnswer saying what is wrong."""
    try:
        response = json.loads(body)
        content = response["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise InvalidAnswer(f"not a chat-completions response ({type(error).__name__}: {error})") from None
    if not isinstance(content, str):
        raise InvalidAnswer(f"message content is {type(content).__name__}, not text")
    text = content.strip()
    fenced = _FENCE.match(text)
    if fenced:  # models without a JSON mode like ```json fences
        text = fenced.group(1)
    if not text.startswith("{") and "{" in text and "}" in text:  # a sentence before or after the object
        text = text[text.index("{"):text.rindex("}") + 1]
    try:
        answer = json.loads(text)
    except ValueError as error:
        raise InvalidAnswer(f"content is not JSON ({error}): {content[:120]!r}") from None
    if not isinstance(answer, dict):
        raise InvalidAnswer(f"content is a JSON {type(answer).__name__}, not an object")
    lists = []
    for name in ("paraphrases", "negations"):
        value = answer.get(name)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise InvalidAnswer(f"no {name!r} list in the answer (keys: {', '.join(map(str, answer)) or 'none'})")
        lists.append(value)
    chosen_p, problems_p = select_texts(caption, lists[0], paraphrases)
    chosen_n, problems_n = select_texts(caption, lists[1], negations, avoid=tuple(chosen_p))
    if len(chosen_p) < paraphrases or len(chosen_n) < negations:
        problems = "; ".join(problems_p + problems_n) or "too few texts"
        raise InvalidAnswer(f"{len(chosen_p)}/{paraphrases} paraphrase(s) and {len(chosen_n)}/{negations} "
                            f"negation(s) usable ({problems})")
    return chosen_p, chosen_n


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LLMGenerator:
    """Thread-safe: `generate` may run in several threads at once (`--concurrency`)."""

    name = "llm"

    def __init__(self, settings: LLMSettings, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.rng_lock = threading.Lock()
        self.stats = Stats()
        self.fatal: str | None = None  # set by the first fatal error: later calls fail without a request
        self.reached = False  # whether any request got an HTTP answer (good or bad) from the server

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with jitter: half the doubled delay plus a random half, capped."""
        delay = min(self.settings.max_wait, self.settings.backoff * 2 ** retry)
        with self.rng_lock:
            return delay / 2 + self.rng.uniform(0, delay / 2)

    def _post(self, caption: str, paraphrases: int, negations: int) -> bytes:
        body: dict[str, object] = {"model": self.settings.model,
                                   "messages": build_messages(caption, paraphrases, negations),
                                   "temperature": self.settings.temperature,
                                   "max_tokens": self.settings.max_tokens}
        if self.settings.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        self.stats.add("requests")
        with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
            self.reached = True
            return response.read()

    def generate(self, caption: str, paraphrases: int, negations: int) -> Outcome:
        """Ask until a valid answer arrives or the retries are spent; FatalLLMError on 401/403/404, and on a
        refused connection or an unknown host name before the server ever answered."""
        last_error = "no attempt"
        for attempt in range(self.settings.max_retries + 1):
            if self.fatal is not None:  # another thread hit it: the same request would fail the same way
                raise FatalLLMError(self.fatal)
            wait = 0.0
            try:
                body = self._post(caption, paraphrases, negations)
                chosen_p, chosen_n = parse_answer(body, caption, paraphrases, negations)
                return Outcome(chosen_p, chosen_n, None, attempt + 1)
            except InvalidAnswer as error:
                self.stats.add("invalid answers")
                last_error = f"invalid answer: {error}"
            except urllib.error.HTTPError as error:
                self.reached = True
                detail = error.read()[:200].decode("utf-8", errors="replace")
                if error.code in FATAL_STATUSES:
                    self.fatal = f"{self.url}: HTTP {error.code} {FATAL_STATUSES[error.code]}: {detail}"
                    raise FatalLLMError(self.fatal) from None
                if error.code not in RETRY_STATUSES and error.code < 500:
                    return Outcome([], [], f"HTTP {error.code}: {detail}", attempt + 1)  # 400: this caption only
                self.stats.add("HTTP 429" if error.code == 429 else "HTTP 5xx" if error.code >= 500 else
                               f"HTTP {error.code}")
                last_error = f"HTTP {error.code}: {detail}"
                server_wait = retry_after_seconds(error.headers.get("Retry-After") if error.headers else None)
                wait = min(self.settings.max_wait, server_wait) if server_wait is not None else self._backoff(attempt)
            except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as error:
                # HTTPException: the connection broke mid-answer (IncompleteRead, BadStatusLine)
                reason = getattr(error, "reason", error)
                if not self.reached and isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
                    # Nothing listens there (or the name does not resolve) and nothing ever answered: every
                    # request would fail the same way, so the run stops instead of retrying each caption.
                    self.stats.add("connection errors")
                    self.fatal = (f"cannot reach {self.url}: {reason.strerror or reason}; start the server or "
                                  "fix --base-url")
                    raise FatalLLMError(self.fatal) from None
                timed_out = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                self.stats.add("timeouts" if timed_out else "connection errors")
                last_error = (f"timeout after {self.settings.timeout:g} s" if timed_out
                              else f"connection error: {reason}")
                wait = self._backoff(attempt)
            if attempt < self.settings.max_retries:
                self.stats.add("retries")
                if wait > 0:
                    self.sleep(wait)
        return Outcome([], [], f"{last_error} (after {self.settings.max_retries + 1} attempts)",
                       self.settings.max_retries + 1)
