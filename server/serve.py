"""`recallfix serve`'s backend: vLLM's own API servers as child processes, and the patch they serve.

- **lora**: one vLLM server serves base and the patch as a LoRA adapter (`--enable-lora`, the adapter's
  projections only as `--lora-target-modules`, `--max-lora-rank` from the patch). `load_patch` loads the
  new adapter at run time and unloads the old one once its requests are done.
- **merged**: a second vLLM server runs the merged checkpoint. `load_patch` starts a third with the new
  one, switches to it when it is ready, and stops the old one once its requests are done.

A server that exits unasked is reported (log with its last lines, `recallfix_upstream_crashes_total`,
`/ready` false, 503 for its variant) and started again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx

from recallfix.patches import Patch
from recallfix.patches.export import export_refusals

from .config import ServeConfig
from .front import Target, distinct_upstreams
from .metrics import Metrics, PatchState
from .patching import (
    PatchRefused,
    adapter_rank,
    check_against_checkpoint,
    export_cached,
    lora_modules,
    vllm_lora_rank,
)
from .routing import Variant
from .upstream import Upstream, UpstreamProcess, free_port
from .vllm_args import upstream_command

log = logging.getLogger(__name__)

LORA_TARGETS_WITHOUT_PATCH = ("o_proj", "down_proj")  # every projection a recallfix patch can scale


@dataclass(frozen=True)
class Plan:
    """What `recallfix serve` runs, decided before anything starts."""

    model_dir: Path
    name: str
    vllm_argv: tuple[str, ...]  # the user's vLLM options, validated by vLLM's parser
    env: tuple[tuple[str, str], ...]  # for every upstream (KV cache size, usage stats)
    mode: str  # lora | merged
    reason: str  # why this mode (logged, and in recallfix_patch_info)
    patch: Patch | None
    max_lora_rank: int | None  # lora mode: the server's capacity
    lora_targets: tuple[str, ...]  # lora mode


def adapter_name(patch: Patch) -> str:
    """The adapter's name on the upstream (internal: clients say NAME:patched)."""
    return f"patch-{patch.id[:16]}"


class ServeBackend:
    def __init__(self, plan: Plan, config: ServeConfig, metrics: Metrics, drain_timeout: float) -> None:
        self.plan, self.config, self.metrics, self.drain_timeout = plan, config, metrics, drain_timeout
        self.key = secrets.token_urlsafe(24)  # the upstreams answer only the front
        self.targets: dict[Variant, Target] = {}
        self.patch: PatchState | None = None
        self._processes: list[UpstreamProcess] = []
        self._lock = asyncio.Lock()  # one load_patch at a time
        self._restarts: set[asyncio.Task[None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        self.dead = False  # a server exited and did not come back: /health says replace this process

    # -- processes ---------------------------------------------------------------------------------
    def _spawn(self, role: str, model_dir: Path, served_name: str, extra: list[str],
               env: dict[str, str] | None = None) -> Upstream:
        port = free_port()
        command = upstream_command(model_dir, self.plan.vllm_argv, port=port, api_key=self.key,
                                   served_name=served_name, extra=extra)
        process = UpstreamProcess(role, command, {**dict(self.plan.env), **(env or {})}).start()
        self._processes.append(process)
        return Upstream(role, f"http://127.0.0.1:{port}", self.key, process=process)

    def upstreams(self) -> list[Upstream]:
        return distinct_upstreams(self.targets)

    async def start(self, client: httpx.AsyncClient) -> None:
        plan = self.plan
        if plan.mode == "lora":
            extra = ["--enable-lora", "--max-lora-rank", str(plan.max_lora_rank), "--max-loras", "2",
                     "--lora-target-modules", *plan.lora_targets]
            adapter = None
            if plan.patch is not None:
                adapter = export_cached("lora", plan.model_dir, plan.patch, self.config.cache_dir)
                extra += ["--lora-modules", f"{adapter_name(plan.patch)}={adapter}"]
            role = "shared" if plan.patch is not None else "base"
            shared = self._spawn(role, plan.model_dir, plan.name, extra,
                                 {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
            self.targets["base"] = Target(shared, plan.name)
            if plan.patch is not None:
                self.targets["patched"] = Target(shared, adapter_name(plan.patch))
        else:
            self.targets["base"] = Target(self._spawn("base", plan.model_dir, plan.name, []), plan.name)
            if plan.patch is not None:
                merged = export_cached("merged", plan.model_dir, plan.patch, self.config.cache_dir)
                patched_name = f"{plan.name}:patched"
                self.targets["patched"] = Target(self._spawn("patched", merged, patched_name, []), patched_name)
        try:
            await asyncio.gather(*(u.process.wait_ready(u, client, self.config.upstream_start_timeout)
                                   for u in self.upstreams() if u.process is not None))
        except BaseException:
            await self.stop()
            raise
        if plan.patch is not None:
            self.patch = PatchState.of(plan.patch, plan.mode, plan.reason)
        for upstream in self.upstreams():
            self.metrics.set_upstream(upstream.role, True)

    async def tick(self, client: httpx.AsyncClient) -> None:
        """Called every few seconds: probe a server marked down that still runs (a request to it broke, or /health
        was slow), and report and restart one that exited unasked."""
        for upstream in self.upstreams():
            process = upstream.process
            if process is None or process.stopping or upstream.role in self._restarting():
                continue
            if process.alive:
                if not upstream.up and await upstream.probe(client):
                    log.info("vLLM (%s) answers /health again", upstream.role)
                    self.metrics.set_upstream(upstream.role, True)
                continue
            upstream.up = False
            self.metrics.set_upstream(upstream.role, False)
            self.metrics.upstream_crashes.labels(self.metrics.model, upstream.role).inc()
            log.error("%s; restarting it", process.crash_report())
            task = asyncio.get_running_loop().create_task(self._restart(upstream, client), name=upstream.role)
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def _restarting(self) -> set[str]:
        return {task.get_name() for task in self._restarts}

    async def _restart(self, upstream: Upstream, client: httpx.AsyncClient) -> None:
        old = upstream.process
        assert old is not None
        self._processes.remove(old)
        process = UpstreamProcess(old.role, old.command, old.env).start()
        self._processes.append(process)
        upstream.process = process
        try:
            await process.wait_ready(upstream, client, self.config.upstream_start_timeout)
        except RuntimeError as err:
            log.error("vLLM (%s) did not come back: %s", upstream.role, err)
            self.dead = True
            return
        self.metrics.set_upstream(upstream.role, True)
        log.info("vLLM (%s) is back", upstream.role)

    async def stop(self) -> None:
        for task in [*self._restarts, *self._retiring]:
            task.cancel()
        for process in self._processes:
            process.terminate()
        await asyncio.gather(*(p.stop(self.drain_timeout) for p in self._processes))

    # -- load_patch ------------------------------------------------------------------------------------
    async def load_patch(self, patch: Patch, client: httpx.AsyncClient) -> PatchState:
        """Serve `patch` as NAME:patched. PatchRefused (nothing changed) if it cannot be served."""
        async with self._lock:
            await asyncio.to_thread(check_against_checkpoint, self.plan.model_dir, patch)
            if self.plan.mode == "lora":
                return await self._load_lora(patch, client)
            return await self._load_merged(patch, client)

    async def _load_lora(self, patch: Patch, client: httpx.AsyncClient) -> PatchState:
        refused = (await asyncio.to_thread(export_refusals, self.plan.model_dir, patch))["lora"]
        if refused:
            raise PatchRefused(f"this server serves the patch as a LoRA adapter (--patch-mode lora), and LoRA "
                               f"cannot serve this one: {refused}; restart with --patch-mode merged to serve it")
        adapter = await asyncio.to_thread(export_cached, "lora", self.plan.model_dir, patch, self.config.cache_dir)
        rank, capacity = adapter_rank(adapter), self.plan.max_lora_rank or 0
        if vllm_lora_rank(rank) > capacity:
            raise PatchRefused(f"the patch's adapter has rank {rank}, above this server's --max-lora-rank "
                               f"{capacity}; restart with a larger --max-lora-rank, or --patch-mode merged")
        outside = sorted(set(lora_modules(adapter)) - set(self.plan.lora_targets))
        if outside:
            raise PatchRefused(f"the patch scales {', '.join(outside)}, which this server has no LoRA on "
                               f"(--lora-target-modules {' '.join(self.plan.lora_targets)}); restart to serve it")
        base = self.targets["base"]
        name = adapter_name(patch)
        response = await client.post(base.upstream.url + "/v1/load_lora_adapter",
                                     json={"lora_name": name, "lora_path": str(adapter)},
                                     headers=base.upstream.headers())
        if response.status_code != 200 and "already been loaded" not in response.text:
            raise PatchRefused(f"vLLM did not load the adapter: {response.status_code} {response.text[:500]}")
        old = self.targets.get("patched")
        self.targets["patched"] = Target(base.upstream, name)
        if base.upstream.role == "base":
            base.upstream.role = "shared"
        if old is not None and old.model != name:
            self._retire(self._unload_adapter(old, client))
        self.patch = PatchState.of(patch, "lora", "loaded at run time into the base server")
        return self.patch

    async def _unload_adapter(self, old: Target, client: httpx.AsyncClient) -> None:
        await old.drain(self.drain_timeout)
        response = await client.post(old.upstream.url + "/v1/unload_lora_adapter", json={"lora_name": old.model},
                                     headers=old.upstream.headers())
        if response.status_code != 200:
            log.warning("unloading the old adapter %s: %d %s", old.model, response.status_code, response.text[:200])

    async def _load_merged(self, patch: Patch, client: httpx.AsyncClient) -> PatchState:
        merged = await asyncio.to_thread(export_cached, "merged", self.plan.model_dir, patch, self.config.cache_dir)
        served_name = f"{self.plan.name}:patched"
        upstream = self._spawn("patched", merged, served_name, [])
        assert upstream.process is not None
        try:
            await upstream.process.wait_ready(upstream, client, self.config.upstream_start_timeout)
        except BaseException as err:
            self._processes.remove(upstream.process)
            await upstream.process.stop(self.drain_timeout)
            if isinstance(err, RuntimeError):
                raise PatchRefused(f"the merged checkpoint's vLLM server did not start: {err}") from None
            raise
        old = self.targets.get("patched")
        self.targets["patched"] = Target(upstream, served_name)
        self.metrics.set_upstream("patched", True)
        if old is not None:
            self._retire(self._stop_old(old))
        self.patch = PatchState.of(patch, "merged", "a new vLLM server with the merged checkpoint")
        return self.patch

    async def _stop_old(self, old: Target) -> None:
        if not await old.drain(self.drain_timeout):
            log.warning("the old patched server still had %d requests after %.0f s", old.in_flight,
                        self.drain_timeout)
        if old.upstream.process is not None:
            await old.upstream.process.stop(self.drain_timeout)
            self._processes.remove(old.upstream.process)

    def _retire(self, work: object) -> None:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def env_for(on_cpu: bool, kv_cache_gib: int | None) -> dict[str, str]:
    """The environment of every upstream: no usage statistics sent to vLLM's authors unless the operator
    says so; on CPU, a KV cache sized for this machine, and no thread pinning (unless given).

    vLLM's CPU default (`VLLM_CPU_OMP_THREADS_BIND=auto`) pins each engine's worker to the same cores
    of the first NUMA node: two engines (merged mode) then share one core of a 2-core machine while the
    other idles, and under load a request timed out after 5 minutes."""
    env = {"VLLM_NO_USAGE_STATS": os.environ.get("VLLM_NO_USAGE_STATS", "1")}
    if on_cpu and kv_cache_gib is not None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return env
