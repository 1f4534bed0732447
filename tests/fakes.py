"""A fake sampler and a fake scorer: second implementations of the engine contract, no models.

They record what the service asks of them, so the pipeline's own rules (selection, pinning,
release, the greedy rule, failures) can be tested alone.
"""

from __future__ import annotations

from server.engines.contract import Candidate, SampleRequest
from server.reward import Reward


class Handle:
    """What `load` hands out: names the checkpoint it stands for."""

    def __init__(self, path):
        self.path = path


class FakeEngine:
    """Loads by name, records what it releases, never dies."""

    def __init__(self):
        self.released: list[Handle] = []

    async def load(self, info) -> Handle:
        return Handle(info.path)

    async def release(self, weights) -> None:
        self.released.append(weights)

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        pass


class FakeSampler(FakeEngine):
    """Candidate i of a request is " w" repeated i + 1 times, so later candidates are longer."""

    def __init__(self, fail_with: Exception | None = None):
        super().__init__()
        self.fail_with = fail_with
        self.requests: list[SampleRequest] = []

    async def sample(self, request: SampleRequest) -> list[Candidate]:
        if self.fail_with is not None:
            raise self.fail_with
        self.requests.append(request)
        return [Candidate(" w" * (i + 1), [7] * (i + 1), "length") for i in range(request.n)]


class FakeScorer(FakeEngine):
    """The reward of an input is a function of its token ids that the tests can recompute."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[list[int]], Handle]] = []

    @staticmethod
    def reward(ids: list[int]) -> float:
        return float(len(ids) % 5) - 0.1 * len(ids)

    async def score(self, inputs: list[list[int]], weights) -> list[Reward]:
        self.calls.append((inputs, weights))
        return [Reward(self.reward(ids)) for ids in inputs]
