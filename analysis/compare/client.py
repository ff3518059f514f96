"""The HTTP side of `recallfix compare`: an OpenAI-compatible `/v1/completions` endpoint asked two things per fact,
and the per-fact numbers read from its answers.

Per fact and model, two requests (greedy, temperature 0):

    score     prompt + " " + answer, echo=True, max_tokens=0 (1 where a server refuses 0), logprobs=k: the server's
              own tokens of the whole text, each with its log-probability and the top k at its position
    generate  prompt, max_tokens = the answer's token count + `extra_tokens`, echo=True, logprobs=1: the greedy
              continuation, and the prompt's tokens as the server splits the prompt alone

Placing the answer. Its tokens are those of `score` from character len(prompt) on (the server's text offsets).
The answer is placed when a token starts exactly there and the prompt's own tokens (`generate`) are the tokens
before it: the condition under which `facts.answer_token_id` takes the next joint token, so the first answer token
is the one `recallfix analyze` scores. Otherwise (the tokenizer merges across the boundary, or splits the prompt
differently alone) the fact is unplaced: counted and reported, left out of both models' statistics.

The numbers of the first answer token (position i, the next-token distribution after the prompt), the quantities
of `lens.answer_stats` read from the top k:

    p_answer     exp(logprob of the answer's first token)          (exact: the server scores that token)
    confidence   exp(max of the top k)                             (exact: the top-1 is in the top k)
    correct      no top-k token has a higher logprob (rank 1)      (exact)
    margin       its logprob minus the best other token's: how near the top-1 is to changing
    rank         1 + top-k tokens above the answer; when all k are above it, only "rank > k" is known: `rank` is
                 None and `rank_above` = k (rank is read only as rank == 1, so the statistics are exact)
    brier        sum_k p_k^2 - 2 p_answer + 1 over the top k and the answer; the rest of the vocabulary adds
                 between 0 and `brier_tail_max` = (1 - their mass) * (smallest top-k p): reported, not added

and of the whole answer: `answer_logprob` (sum over its tokens), `answer_greedy` (each answer token is the top-1
given the ones before it: lm-evaluation-harness's `is_greedy`), and the greedy generation's normalised exact match.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from ..data.facts import Fact

RETRY_STATUS = (429, 503)  # overloaded or not ready: worth waiting for
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
CONNECT_TIMEOUT_S = 5.0  # an unreachable server fails within this


class CompareError(ValueError):
    """`recallfix compare` cannot go on; the message is one line naming the server, model or file."""


class RefusedError(CompareError):
    """The server answered a request with an error status (other than 401, 403, 404 or a lasting 429/503)."""


# -- matching ----------------------------------------------------------------------------------------

ARTICLES = ("a", "an", "the")


def normalize_words(text: str) -> list[str]:
    """Lower-case words of `text` (punctuation and whitespace dropped), without a leading article."""
    words = re.findall(r"\w+", text.lower())
    return words[1:] if words[:1] and words[0] in ARTICLES and len(words) > 1 else words


def exact_match(generation: str, answer: str) -> bool:
    """The generation starts with the answer, word for word after `normalize_words` on both (a greedy generation
    goes on after the answer, so what follows it does not count)."""
    want = normalize_words(answer)
    return bool(want) and normalize_words(generation)[: len(want)] == want


# -- one fact's numbers ------------------------------------------------------------------------------


@dataclass
class FactScore:
    """One model's numbers on one fact (see the module doc); the numbers are None when `unplaced` says why."""

    unplaced: str | None = None
    answer_tokens: list[str] | None = None
    answer_logprob: float | None = None
    answer_greedy: bool | None = None
    p_answer: float | None = None
    rank: int | None = None
    rank_above: int | None = None  # rank is beyond the k top logprobs returned: rank > rank_above
    confidence: float | None = None
    prediction: str | None = None
    correct: bool | None = None
    margin: float | None = None  # logprob of the answer's first token minus the best other's (> 0: correct)
    brier: float | None = None
    brier_tail_max: float | None = None
    top_logprobs: list[float] | None = None  # the first answer token's position: the top k, most likely first
    generation: str | None = None
    exact_match: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _logprobs(choice: dict[str, Any]) -> tuple[list[str], list[int], list[float | None], list[dict | None]]:
    lp = choice.get("logprobs") or {}
    tokens, offsets = lp.get("tokens"), lp.get("text_offset")
    values, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
    if not tokens or offsets is None or values is None or tops is None:
        raise ValueError("no echo logprobs")
    return tokens, offsets, values, tops


def answer_start(offsets: list[int], n_chars: int) -> int | None:
    """Index of the token that starts at character `n_chars`; None when a token straddles it."""
    for i, start in enumerate(offsets):
        if start >= n_chars:
            return i if start == n_chars else None
    return None


def first_token_numbers(token: str, logprob: float, top: dict[str, float], k: int) -> dict[str, Any]:
    """p(answer), rank, confidence, prediction, correct and Brier of one position: the answer's token and logprob
    there and the top-k logprobs (which may hold the answer's token too)."""
    others = {t: lp for t, lp in top.items() if t != token}
    above = [lp for lp in others.values() if lp > logprob]
    prediction, best = max(others.items(), key=lambda kv: kv[1], default=(token, logprob))
    p_answer = math.exp(logprob)
    probs = [math.exp(lp) for lp in others.values()]
    tail = max(0.0, 1.0 - sum(probs) - p_answer)
    return {
        "p_answer": p_answer,
        "rank": len(above) + 1 if len(above) < k else None,
        "rank_above": k if len(above) >= k else None,
        "confidence": math.exp(max(best, logprob)),
        "prediction": prediction if best > logprob else token,
        "correct": not above,
        "margin": logprob - best if others else None,
        "brier": sum(p * p for p in probs) + p_answer * p_answer - 2 * p_answer + 1,
        "brier_tail_max": tail * min(probs, default=1.0),
        "top_logprobs": sorted({**top, token: logprob}.values(), reverse=True)[:k],
    }


def text_shift(tokens: list[str], offsets: list[int], text: str) -> int:
    """Characters that the offsets count before the echoed text: tokens the text leaves out, such as Gemma's
    `<bos>`, which vLLM echoes as a token and counts in `text_offset` but not in `text`."""
    return max(0, offsets[-1] + len(tokens[-1]) - len(text))


def read_score(choice: dict[str, Any], prompt: str, answer: str, k: int) -> tuple[FactScore, list[str]]:
    """The answer's numbers from a `score` answer (echo logprobs of prompt + " " + answer, and a generated token
    where the server needs one), and the tokens before the answer (to check against the prompt's own)."""
    tokens, offsets, values, tops = _logprobs(choice)
    shift = text_shift(tokens, offsets, choice.get("text") or "")
    i = answer_start(offsets, shift + len(prompt))
    if i is None or i == len(tokens):
        return FactScore(unplaced="a token spans the end of the prompt and the answer"), tokens[: i or 0]
    if i == 0 or offsets[i - 1] < shift:
        return FactScore(unplaced="the prompt has no token of its own"), []
    end = answer_start(offsets, shift + len(prompt) + 1 + len(answer))  # a token generated after the answer
    end = len(tokens) if end is None else end
    if values[i] is None or tops[i] is None or any(v is None for v in values[i:end]):
        raise ValueError("no echo logprobs")
    answer_values = [float(v) for v in values[i:end]]
    numbers = first_token_numbers(tokens[i], answer_values[0], tops[i], k)
    greedy = all(v >= max(top.values(), default=v) for v, top in zip(answer_values, tops[i:end], strict=True))
    return FactScore(answer_tokens=tokens[i:end], answer_logprob=sum(answer_values), answer_greedy=greedy,
                     **numbers), tokens[:i]


# -- the server --------------------------------------------------------------------------------------


def api_root(base_url: str) -> str:
    """`http://host:port/v1` from the server's address given with or without `/v1`."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _message(response: httpx.Response) -> str:
    """The server's error message on one line (OpenAI's {"error": {"message": ...}} or FastAPI's {"detail"})."""
    try:
        body = response.json()
    except ValueError:
        text = response.text
    else:
        error = body.get("error") if isinstance(body, dict) else None
        text = (error.get("message") if isinstance(error, dict) else error) or (
            body.get("detail") or body.get("message") if isinstance(body, dict) else None) or response.text
    return " ".join(str(text).split())[:300]


class Endpoint:
    """One model behind one OpenAI-compatible server: the two requests of a fact, with retries on 429/503."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None, timeout: float, max_retries: int,
                 top_logprobs: int, extra_tokens: int) -> None:
        self.url, self.model = api_root(base_url), model
        self.k, self.extra_tokens, self.max_retries = top_logprobs, extra_tokens, max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S))
        self.score_max_tokens = 0  # set to 1 by `check` where the server refuses 0
        self.retries = 0  # requests that were answered 429/503 and sent again

    async def aclose(self) -> None:
        await self.client.aclose()

    def _where(self) -> str:
        return f"{self.url} (model {self.model!r})"

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """The server's answer, after up to `max_retries` retries of 429/503 (exponential backoff, or the server's
        Retry-After); CompareError when it cannot be reached or stays busy."""
        delay = FIRST_BACKOFF_S
        for attempt in range(self.max_retries + 1):
            try:
                response = await self.client.request(method, self.url + path, json=body)
            except httpx.TimeoutException as err:
                what = "connect" if isinstance(err, httpx.ConnectTimeout) else "answer"
                raise CompareError(f"{self.url}: no {what} within the time limit ({type(err).__name__})") from None
            except httpx.TransportError as err:
                raise CompareError(f"{self.url}: server unreachable ({type(err).__name__}: {err})") from None
            if response.status_code not in RETRY_STATUS or attempt == self.max_retries:
                return response
            self.retries += 1
            wait = response.headers.get("retry-after", "")
            await asyncio.sleep(min(MAX_BACKOFF_S, float(wait) if wait.replace(".", "", 1).isdigit() else delay))
            delay *= 2
        raise AssertionError("unreachable")  # the loop returns on its last attempt

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.request("POST", "/completions", {"model": self.model, "temperature": 0.0, **body})
        if response.status_code == 404:
            raise CompareError(f"{self._where()}: model not found: {_message(response)}")
        if response.status_code in (401, 403):
            raise CompareError(f"{self.url}: not authorised ({response.status_code}); check --api-key")
        if response.status_code in RETRY_STATUS:
            raise CompareError(f"{self._where()}: still busy ({response.status_code}) after {self.max_retries} "
                               f"retries: {_message(response)}")
        if response.status_code != 200:
            raise RefusedError(f"{self._where()}: request refused ({response.status_code}): {_message(response)}")
        try:
            return response.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CompareError(f"{self._where()}: not an OpenAI completions answer: {response.text[:200]!r}") from None

    async def check(self, probe: Fact) -> None:
        """Fail fast: the server answers, serves the model, and returns echo logprobs (one probe fact)."""
        response = await self.request("GET", "/models")
        if response.status_code in (401, 403):
            raise CompareError(f"{self.url}: not authorised ({response.status_code}); check --api-key")
        if response.status_code == 200:
            try:
                served = [m["id"] for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                served = None  # not a model list: the probe below decides
            if served is not None and self.model not in served:
                raise CompareError(f"{self._where()}: unknown model; the server serves {', '.join(served) or 'none'}")
        try:
            await self.score(probe)
        except RefusedError:
            self.score_max_tokens = 1  # some servers need a token to generate; the echo still scores the text
            await self.score(probe)

    async def score(self, fact: Fact) -> tuple[FactScore, list[str]]:
        choice = await self.completion({"prompt": f"{fact.prompt} {fact.answer}", "echo": True, "logprobs": self.k,
                                        "max_tokens": self.score_max_tokens})
        try:
            return read_score(choice, fact.prompt, fact.answer, self.k)
        except ValueError:
            raise CompareError(f"{self._where()}: the server returned no echo logprobs (compare needs /v1/completions "
                               "with echo=true and logprobs)") from None

    async def fact(self, fact: Fact) -> FactScore:
        """Both requests of one fact, read into its numbers."""
        score, before = await self.score(fact)
        if score.unplaced is not None:
            return score
        assert score.answer_tokens is not None
        choice = await self.completion({"prompt": fact.prompt, "echo": True, "logprobs": 1,
                                        "max_tokens": len(score.answer_tokens) + self.extra_tokens})
        text = choice.get("text", "")
        alone = (choice.get("logprobs") or {}).get("tokens") or []
        if alone[: len(before)] != before:
            return FactScore(unplaced="the prompt alone splits into other tokens than before the answer")
        score.generation = text[len(fact.prompt):] if text.startswith(fact.prompt) else text
        score.exact_match = exact_match(score.generation, fact.answer)
        return score
