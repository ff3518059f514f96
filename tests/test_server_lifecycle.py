"""Patches at run time: `/v1/load_patch` swaps the patched variant under load with no failed request, in
both modes (lora: an adapter loaded into the running vLLM server; merged: a new vLLM server, switched to
when ready, the old one drained and stopped), a refused patch (a bias patch in LoRA mode among them)
changes nothing, bit for bit, and a vLLM server that dies unasked is reported (503 for its variant, /ready,
`recallfix_upstream_crashes_total`, its exit in the log) and started again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from server_fixtures import (
    NAME,
    PATCH_OF,
    START_TIMEOUT_S,
    START_TIMES,
    Metrics,
    Process,
    patch_file,
    scratch_dir,
    wait_for,
)

from recallfix.patches import Patch

PROMPT = "The capital of France is"


def first_logprobs(server: Process, model: str = f"{NAME}:patched") -> list[float]:
    reply = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 3,
                                            "temperature": 0.0, "logprobs": 5})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["logprobs"]["token_logprobs"]


def greedy_replies(server: Process) -> dict[str, tuple[str, list]]:
    """Each variant's greedy text and top logprobs (exact floats: compared bit for bit)."""
    replies = {}
    for model in (NAME, f"{NAME}:patched"):
        reply = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 3,
                                                "temperature": 0.0, "logprobs": 5})
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        replies[model] = (choice["text"], choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"])
    return replies


def served_patch(server: Process) -> dict[str, str]:
    samples = Metrics.parse(server.metrics_text()).samples
    (labels,) = [lab for name, lab, v in samples if name == "recallfix_patch_info" and v == 1]
    return labels


class Load:
    """Clients sending completions and streamed chats to every name until stopped; every status kept."""

    def __init__(self, server: Process, clients: int = 3) -> None:
        self.server, self.statuses, self.stop = server, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, i: int) -> None:
        models = [f"{NAME}:patched", NAME, f"{NAME}:ab"]
        n = 0
        while not self.stop.is_set():
            model = models[(i + n) % 3]
            if n % 2:
                body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                        "stream": True, "user": f"u{i}"}
                with self.server.post_stream("/v1/chat/completions", body) as response:
                    lines = list(response.iter_lines())
                ok = response.status_code == 200 and lines and "data: [DONE]" in lines and not any(
                    '"error"' in line for line in lines)
                self.statuses.append(200 if ok else response.status_code or 599)
            else:
                reply = self.server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4,
                                                             "user": f"u{i}"})
                self.statuses.append(reply.status_code)
            n += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


@pytest.mark.swaps_patch
@pytest.mark.parametrize("kind", [pytest.param(kind, marks=pytest.mark.servers(kind))
                                  for kind in ("serve-lora", "serve-merged")])
def test_load_patch_swaps_under_load_and_back(kind: str, servers) -> None:  # noqa: ANN001
    server = servers[kind]
    mine, other = patch_file(PATCH_OF[kind]), patch_file("other")
    before = first_logprobs(server)
    with Load(server) as load:
        started = time.monotonic()
        swapped = server.post("/v1/load_patch", {"path": str(other)}, timeout=START_TIMEOUT_S)
        START_TIMES.append((f"{kind}: load_patch", time.monotonic() - started))
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["patch"]["applied"] == kind.removeprefix("serve-")
        assert swapped.json()["previous_patch_id"] == Patch.load(mine).id
        after = first_logprobs(server)
    assert load.statuses and set(load.statuses) == {200}, f"failed requests during the swap: {load.statuses}"
    assert after != before, "the new patch changed nothing"
    # Back to its own patch, sent as a document this time. Not under load: the swap under load is the one above
    # (the same code path); under the three clients a merged server's start took twice as long.
    started = time.monotonic()
    back = server.post("/v1/load_patch", {"patch": Patch.load(mine).model_dump(mode="json")},
                       timeout=START_TIMEOUT_S)
    START_TIMES.append((f"{kind}: load_patch back", time.monotonic() - started))
    assert back.status_code == 200, back.text
    assert back.json()["patch"]["biases"] == [str(c) for c in Patch.load(mine).biases]
    assert first_logprobs(server) == pytest.approx(before, abs=1e-5)  # its own patch again
    assert served_patch(server)["patch_id"] == Patch.load(mine).id


@pytest.mark.faults
@pytest.mark.servers("serve-lora")
def test_refused_patches_say_why_and_change_nothing(servers, tiny_dirs, tmp_path: Path) -> None:  # noqa: ANN001
    from recallfix.patches import make_patch
    from recallfix.patches.registry.load import load_causal_lm

    server = servers["serve-lora"]
    before, info = greedy_replies(server), served_patch(server)
    foreign = make_patch(load_causal_lm(tiny_dirs["llama"])[0], {"L1H0": 0.5}).save(scratch_dir("patches") / "f.json")
    good = Patch.load(patch_file("learned")).model_dump(mode="json")
    tampered = Patch.load(patch_file("learned")).model_dump(mode="json")
    tampered["edits"][0]["gain"] = float("1e39")  # not finite once applied in float32
    hashed = Patch.load(patch_file("learned")).model_dump(mode="json")
    tensor = next(iter(hashed["model"]["tensors"]))
    hashed["model"]["tensors"][tensor] = hashed["model"]["tensors"][tensor][::-1]  # the fingerprint tampered
    truncated = scratch_dir("patches") / "truncated.json"
    truncated.write_text(json.dumps(good)[:400])
    non_finite = {}
    for name, gain in (("nan", float("nan")), ("inf", float("inf"))):  # as JSON's NaN and Infinity, in files
        non_finite[name] = scratch_dir("patches") / f"{name}.json"
        non_finite[name].write_text(json.dumps({**good, "edits": [{**good["edits"][0], "gain": gain}]}))
    outside = Path(tmp_path / "p.json")
    outside.write_text(Patch.load(patch_file("learned")).model_dump_json())
    for body, why in (({"path": str(foreign)}, "hidden_size: the patch was made for 128, this model has 576"),
                      ({"patch": tampered}, "finite|gain|invalid"),
                      ({"path": str(truncated)}, r"invalid patch: \(document\): Invalid JSON"),
                      ({"patch": hashed}, rf"model.tensors\['{tensor}'\]: sha256 differs"),
                      ({"path": str(non_finite["nan"])}, "gain must be a finite number, got nan"),
                      ({"path": str(non_finite["inf"])}, "gain must be a finite number, got inf"),
                      ({"path": str(outside)}, "outside the patch directory"),
                      ({"patch": {"edits": "nonsense"}}, "invalid patch"),
                      ({"path": str(patch_file("bias"))}, r"--patch-mode lora.*LoRA cannot.*L29MLP adds a bias.*"
                                                          r"--patch-mode merged")):
        refused = server.post("/v1/load_patch", body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "patch_refused" and "keeps serving" in error["message"]
        assert re.search(why, error["message"]) and "\n" not in error["message"], error["message"]
    assert greedy_replies(server) == before  # both variants, bit for bit
    assert served_patch(server) == info


@pytest.mark.servers("serve-merged")
def test_a_crashed_vllm_server_is_reported_and_started_again(servers) -> None:  # noqa: ANN001
    server = servers["serve-merged"]
    (patched,) = [p for p in psutil.Process(server.proc.pid).children()
                  if f"{NAME}:patched" in p.cmdline() and "--served-model-name" in p.cmdline()]
    before = server.metrics()
    os.killpg(patched.pid, signal.SIGKILL)  # the patched variant's API server and its engine die unasked
    assert wait_for(lambda: server.get("/ready").status_code == 503, timeout=120), "a dead server is not reported"
    down = server.post("/v1/completions", {"model": f"{NAME}:patched", "prompt": "x", "max_tokens": 1})
    assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
    assert down.headers["retry-after"]
    up = server.post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1})
    assert up.status_code == 200  # the other variant serves on
    crashed = server.metrics()
    assert crashed.delta(before, "recallfix_upstream_crashes_total", variant="patched") == 1
    assert crashed.value("recallfix_upstream_up", variant="patched") == 0
    assert "vLLM (patched) exited with signal 9" in server.log()
    # ... and started again from the same command
    started = time.monotonic()
    assert wait_for(lambda: server.get("/ready").status_code == 200, timeout=START_TIMEOUT_S), server.log()[-3000:]
    START_TIMES.append(("serve-merged: restart after a crash", time.monotonic() - started))
    again = server.post("/v1/completions", {"model": f"{NAME}:patched", "prompt": "x", "max_tokens": 1})
    assert again.status_code == 200 and again.headers["x-recallfix-variant"] == "patched"
