"""Peak memory, one definition for the engine (report.json, metrics.jsonl), `losia bench` and the peer
benchmark (benchmarks/peers/), and where a run's memory goes at its peak.

Peak memory is the high-water mark since the last `reset_peak`:
- CUDA: `torch.cuda.max_memory_allocated` (bytes handed out to tensors by the caching allocator).
- CPU: the kernel's peak resident set size of this process (VmHWM). Writing 5 to /proc/self/clear_refs
  (Linux >= 4.0) sets it back to the current RSS; where that is refused the peak stays the process's
  high-water mark since it started (the same number `/usr/bin/time` and ru_maxrss report).

The breakdown (`breakdown`) splits the measured peak into what the run holds: the runtime (CPU: the RSS
before the model is loaded: interpreter, libraries, tokenizer, data), parameters, gradients,
optimizer state, the method's own buffers (LoSiA's scorer, index buffers), the tensors the forward
saves for backward (activations), and the rest: measured minus accounted (the step's temporaries
such as the logits' gradient, allocator slack, and the transient of loading the model).
Parameters, gradients, optimizer state, buffers and activations are exact byte counts of distinct
tensor storages, so the parts do not depend on the allocator or on the machine's load.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch
from torch import nn

from losia_cli import atomic

PARTS = ("runtime", "parameters", "gradients", "optimizer_state", "method_buffers", "activations")


def reset_peak(device: torch.device) -> None:
    """Start a new peak (`losia compare` trains several runs in one process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's high-water mark
        pass


def _status_kib(field: str) -> int | None:
    try:
        return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0])
    except (OSError, IndexError):
        return None


def current(device: torch.device) -> int:
    """Bytes held now: CUDA allocated, or the CPU process's RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def peak(device: torch.device) -> int:
    """Peak bytes since `reset_peak` (see the module doc)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kib * 1024


def storage_id(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it); works on meta, where every data_ptr is 0."""
    return t.untyped_storage()._cdata


def tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (tensors, dicts, lists, objects
    such as GaLore's projector holding its matrix); storages in `seen` are not counted again."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if storage_id(obj) in seen:
            return 0
        seen.add(storage_id(obj))
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """What a model and its optimizer hold between steps: parameters, registered buffers, LoSiA's
    fp32 scorers (gradient accumulator and two EMAs of the layers that score now), optimizer state."""
    seen: set[int] = set()
    scorers = [vars(m.scorer) for m in model.modules() if getattr(m, "scorer", None) is not None]
    return {
        "parameters": tensor_bytes(list(model.parameters()), seen),
        "buffers": tensor_bytes(list(model.buffers()), seen),
        "scorers": tensor_bytes(scorers, seen),
        "optimizer_state": 0 if optimizer is None else tensor_bytes(list(optimizer.state.values()), seen),
    }


class StepAccount:
    """Counts, over the steps taken inside it: the distinct storages one forward saves for backward
    (activations; parameters excluded; the largest micro-batch's) and the gradients' bytes once
    backward has written them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.activations = 0
        self.gradients = 0

    @contextlib.contextmanager
    def measuring(self):
        params = {storage_id(p) for p in self.model.parameters()}
        saved: dict[int, int] = {}
        backward = [False]  # whether the current micro-batch's backward has begun

        def pack(t: torch.Tensor) -> torch.Tensor:
            if backward[0]:  # the next micro-batch's forward: the previous one's tensors are freed
                self.activations = max(self.activations, sum(saved.values()))
                saved.clear()
                backward[0] = False
            # Saved tensors stay alive until backward, so no storage id is reused meanwhile.
            if storage_id(t) not in params:
                saved[storage_id(t)] = t.untyped_storage().nbytes()
            return t

        def unpack(t: torch.Tensor) -> torch.Tensor:
            backward[0] = True
            return t

        grads: dict[int, int] = {}

        def on_grad(p: torch.Tensor) -> None:
            grads[id(p)] = tensor_bytes(p.grad)

        hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in self.model.parameters() if p.requires_grad]
        try:
            # Packed while the forward records; backward unpacks (identity).
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield self
        finally:
            for hook in hooks:
                hook.remove()
            self.activations = max(self.activations, sum(saved.values()))
            self.gradients = max(self.gradients, sum(grads.values()))


def breakdown(measured: int, runtime: int, state: dict[str, int], account: StepAccount | None) -> dict:
    """The report's memory breakdown (bytes): each part, `rest` = measured minus their sum, and the
    measured peak itself (see the module doc). Parts not measured (no step taken) count 0."""
    taken = {} if account is None else {"gradients": account.gradients, "activations": account.activations}
    method_buffers = state.get("buffers", 0) + state.get("scorers", 0)
    parts = {"runtime": runtime, **state, "method_buffers": method_buffers, **taken}
    parts = {k: parts.get(k, 0) for k in PARTS}
    return {**parts, "rest": measured - sum(parts.values()), "measured_peak": measured}


class Snapshot:
    """train.memory_profile: the CUDA allocator's history (every allocation with its stack) over the
    first STEPS steps, dumped to `path` for pytorch.org/memory_viz."""

    STEPS = 3

    def __init__(self, path: Path):
        self.path = path
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    def after_step(self, steps_taken: int, last: bool) -> None:
        if self.path is None or not (steps_taken == self.STEPS or last):
            return
        with atomic.file(self.path) as tmp:
            torch.cuda.memory._dump_snapshot(str(tmp))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.path = None
