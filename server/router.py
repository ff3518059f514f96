"""`recallfix router`'s backend: vLLM deployments that run elsewhere (a Kubernetes Service per variant,
each sized as vLLM allows). Stateless: the A/B assignment is a hash of `user`, so any number of router
replicas agree. The router never starts or changes an upstream; it probes them and routes around none.
"""

from __future__ import annotations

import logging

import httpx

from .config import RouterConfig
from .front import Target, distinct_upstreams
from .metrics import Metrics, PatchState
from .routing import Variant
from .upstream import Upstream

log = logging.getLogger(__name__)


class RouterBackend:
    patch: PatchState | None = None  # the patch lives in the deployment; the router does not see it

    def __init__(self, config: RouterConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        key = config.upstream_api_key
        base = Upstream("base", config.base_url.rstrip("/"), key)
        self.targets: dict[Variant, Target] = {"base": Target(base, config.base_model)}
        if config.patched_url:
            self.targets["patched"] = Target(Upstream("patched", config.patched_url.rstrip("/"), key),
                                             config.patched_model)
        elif config.patched_model:
            self.targets["patched"] = Target(base, config.patched_model)
            base.role = "shared"

    def upstreams(self) -> list[Upstream]:
        return distinct_upstreams(self.targets)

    async def start(self, client: httpx.AsyncClient) -> None:
        await self.tick(client)

    async def tick(self, client: httpx.AsyncClient) -> None:
        for upstream in self.upstreams():
            was = upstream.up
            if await upstream.probe(client) != was:
                log.log(logging.INFO if upstream.up else logging.WARNING, "upstream %s (%s) is %s", upstream.role,
                        upstream.url, "up" if upstream.up else "down")
            self.metrics.set_upstream(upstream.role, upstream.up)
        for variant, target in self.targets.items():
            if target.model is None and target.upstream.up:
                target.model = await self._first_model(target.upstream, client)
                if target.model is not None:
                    log.info("%s: model %r on %s", variant, target.model, target.upstream.url)

    async def _first_model(self, upstream: Upstream, client: httpx.AsyncClient) -> str | None:
        """The first model an upstream lists that is no adapter (its `parent` is null)."""
        try:
            response = await client.get(upstream.url + "/v1/models", headers=upstream.headers(), timeout=10)
            cards = response.json().get("data", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            return None
        return next((card["id"] for card in cards if isinstance(card, dict) and not card.get("parent")), None)

    async def stop(self) -> None:
        pass
