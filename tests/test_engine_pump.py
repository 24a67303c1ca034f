"""RolloutPump, a rollout worker's body, on the real toy engine with hand-timed messages: which weights each
request starts on, and the admit_version it is shipped with. The multi-process runs (test_toy_concurrent.py)
reach these paths only when their timing happens to; here the order of messages is fixed."""

import time

from asyncopd.trace import Recorder
from backends.engine_pump import RolloutPump
from backends.toy_engine import ToyRolloutEngine
from test_toy_engine import model, prompts, tiny_gpt2  # noqa: F401  (model: a fixture)


def pump(model, in_flight_updates: bool) -> RolloutPump:
    engine = ToyRolloutEngine(model, max_batch=1, max_new_tokens=4, seed=3)   # one slot: requests queue
    return RolloutPump(engine, Recorder(time.monotonic), worker=0, in_flight_updates=in_flight_updates)


def drain(p: RolloutPump) -> dict:
    shipped = {}
    while p.busy or p.pending:
        for trajs, scores in p.tick():
            assert scores is None
            shipped.update({t.uid: t for t in trajs})
    return shipped


def test_in_flight_load_starts_queued_requests_on_newer_weights(model):
    p = pump(model, in_flight_updates=True)
    p.offer([(uid, x, 0) for uid, x in enumerate(prompts(3, seed=2))] + [(3, prompts(1, seed=5)[0], 1)])
    first = p.tick()                      # requests 0-2 enter the engine; 3 (admitted at 1) waits for weights 1
    assert first == [] and [r[0] for r in p.pending] == [3] and p.engine.n_unfinished == 3
    p.tick()                              # request 0 has decoded 2 of its 4 tokens on version 0
    p.offer_weights(1, tiny_gpt2(seed=1, scale=10.0).state_dict())
    p.offer_weights(0, model.state_dict())   # an older publication never replaces a newer one
    shipped = drain(p)
    assert sorted(shipped) == [0, 1, 2, 3]
    assert shipped[0].token_versions.tolist() == [0, 0, 1, 1] and shipped[0].behav_version == 0
    for uid in (1, 2):                    # queued in the engine at version 0, given a slot after the load
        assert (shipped[uid].behav_version, shipped[uid].admit_version) == (1, 0)
    assert (shipped[3].behav_version, shipped[3].admit_version) == (1, 1)
    assert [e.version for e in p.rec.events if e.kind == "rollout"] == [0, 1, 1, 1]


def test_between_rollouts_load_waits_for_the_engine_to_drain_and_holds_new_starts(model):
    p = pump(model, in_flight_updates=False)
    p.offer([(0, prompts(1, seed=2)[0], 0)])
    p.tick()
    p.offer_weights(1, tiny_gpt2(seed=1, scale=10.0).state_dict())
    p.offer([(1, prompts(1, seed=3)[0], 0)])   # admitted at 0, but version 1 is waiting: held until it loads
    p.tick()
    assert [r[0] for r in p.pending] == [1] and p.engine.version == 0
    shipped = drain(p)
    assert shipped[0].token_versions.tolist() == [0] * 4          # never a mixed-version trajectory
    assert shipped[1].token_versions.tolist() == [1] * 4 and shipped[1].admit_version == 0
    assert p.engine.version == 1

