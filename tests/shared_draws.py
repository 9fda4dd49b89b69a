"""Running an engine while counting its random draws: the tests that pin that unseeded
requests share one draw a step, whatever their number."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

from foretell.engine import Engine


class OpNames(TorchDispatchMode):
    """The aten ops dispatched, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def run_counting_draws(engine: Engine) -> tuple[dict, list[tuple[int, int]]]:
    """Step ``engine`` until it is done: its outputs by request id, and each step's count of
    ``rand`` and ``multinomial`` ops. After every step, no live request holds a generator of
    its own (asserted)."""
    outputs, draws_per_step = {}, []
    while engine.has_unfinished_requests():
        ops = OpNames()
        with ops:
            for out in engine.step():
                outputs[out.request_id] = out
        draws_per_step.append((ops.names.count("aten.rand"), ops.names.count("aten.multinomial")))
        assert all(req.generator is None for req in engine._live.values())
    return outputs, draws_per_step
