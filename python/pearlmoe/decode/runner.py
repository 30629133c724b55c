"""One model's side of a decode: its static KV cache and its step, run eagerly, compiled, or
replayed from CUDA graphs.

A step takes S new tokens per sequence, writes their K/V after each sequence's current length
(``runner.lens``, on the device) and returns what the decode loop needs of their logits: the greedy
tokens, or the sampling distributions. It does no host work (``Transformer.step``): the loops move
the lengths with tensor ops and sync with the host once per round.

Backends:
  eager      the ops one by one (the baseline; the fallback where nothing else works).
  compile    ``torch.compile(fullgraph=True)``: on the CPU inductor's C++ wrapper, which runs the
             whole step in C++ without the GIL (so PEARL's two sides really run at once); the
             pearlmoe ops enter the graph through their fake kernels. One graph for S = 1 and one
             for every S > 1 (dynamic), reused for any cache capacity; inductor caches the
             compiled code on disk, so a second run compiles in seconds.
  cudagraph  CUDA only: the eager step captured once per window width and replayed, as vLLM and
             gpt-fast do: a small model's forward is launch-bound.
  fused      CPU only: the whole step as one C++ call over the eager step's kernels
             (pearlmoe.decode.fused; bit-identical to eager), and a draft's γ tokens as one call.
             For the models it covers (Llama and Hunyuan-style layers); others take compile.

Shape letters: B sequences, S tokens per step, V vocabulary.
"""

import copy
import time
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model.transformer import Transformer
from . import fused
from .common import num_threads
from .sampling import logits_to_probs

BACKENDS = ("eager", "compile", "cudagraph", "fused")

# Called with a one-line note when a step is about to be compiled or captured (the CLI prints
# it, so a first run does not look hung).
notify: Callable[[str], None] | None = None
_built: set[tuple] = set()


@dataclass(frozen=True)
class Sampling:
    """How logits become a distribution; temperature 0 is greedy (argmax, no distribution).
    ``logits=True``: the step returns the fp32 logits themselves (as its "probs"), for callers
    that sample each sequence its own way (the server's requests)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    logits: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and not self.logits


def default_backend(device: torch.device | str) -> str:
    """cudagraph on CUDA, fused on the CPU (a runner whose model the fused step does not cover
    compiles its step instead, or runs it eagerly where torch.compile cannot run)."""
    return "cudagraph" if torch.device(device).type == "cuda" else "fused"


def effective_backend(model: Transformer, backend: str) -> str:
    """The backend a Runner of this model runs when asked for ``backend``: fused where the fused
    step covers the model, else cudagraph on CUDA, compile on the CPU (eager without a C++
    compiler)."""
    if backend != "fused" or fused.unsupported(model) is None:
        return backend
    if model.device.type == "cuda":
        return "cudagraph"
    return "compile" if compile_available() else "eager"


_compile_ok: bool | None = None


def compile_available() -> bool:
    """Whether torch.compile can build CPU code here (it needs a C++ compiler)."""
    global _compile_ok
    if _compile_ok is None:
        import shutil

        _compile_ok = shutil.which("g++") is not None or shutil.which("c++") is not None
    return _compile_ok


def _step(
    model: Transformer, ids: Tensor, cache, sampling: Sampling
) -> tuple[Tensor | None, Tensor | None]:
    """The whole step, as one function for torch.compile and CUDA-graph capture: (probs [B, S, V]
    or None, greedy tokens [B, S] or None)."""
    return _outputs(model.step(ids, cache), sampling)  # logits [B, S, V] fp32


def _outputs(logits: Tensor, sampling: Sampling) -> tuple[Tensor | None, Tensor | None]:
    if sampling.logits:
        return logits, None
    if sampling.greedy:
        return None, logits.argmax(-1)
    return logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p), None


class Runner:
    """A model with a static KV cache for ``batch`` sequences of up to ``capacity`` tokens.

    ``runner(ids)`` runs a step over ids [B, S] at ``runner.lens`` without advancing them; the
    caller adds what it keeps (``runner.lens += n``). With the cudagraph backend the outputs live
    in the graph's static buffers until the next step of the same width: clone to keep them.
    """

    def __init__(
        self,
        model: Transformer,
        batch: int,
        capacity: int,
        backend: str = "eager",
        sampling: Sampling = Sampling(),
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cudagraph" and model.device.type != "cuda":
            raise ValueError("the cudagraph backend needs a model on a CUDA device")
        backend = effective_backend(model, backend)  # `runner.backend` says which one runs
        self._fused = fused.build(model) if backend == "fused" else None
        self.model, self.backend, self.sampling = model, backend, sampling
        self.cache = model.new_cache(batch, capacity)
        self.device = model.device
        self._graphs: dict[int, tuple] = {}  # cudagraph: width -> (graph, ids buffer, outputs)
        self._compiled = None
        self._warm: set[int] = set()  # widths > 1 already marked dynamic for the compiled step
        self._views: dict[int, Runner] = {}
        if backend == "compile":
            self._mark_dynamic()
            self._compiled = _compiled_step(model)

    def _mark_dynamic(self) -> None:
        # Any capacity, one graph: the cache's length dimension is symbolic.
        torch._dynamo.mark_dynamic(self.cache.k, 2)
        torch._dynamo.mark_dynamic(self.cache.v, 2)

    def rows(self, n: int) -> "Runner":
        """This runner over its first n sequences only: the same cache rows (views) and compiled
        steps, so a server steps over the slots in use. Views are kept per n."""
        if n == self.batch:
            return self
        if n not in self._views:
            view = copy.copy(self)
            view.cache = self.cache.rows(0, n)
            view._graphs, view._warm, view._views = {}, set(), {}
            if self.backend == "compile":
                view._mark_dynamic()
            self._views[n] = view
        return self._views[n]

    @property
    def lens(self) -> Tensor:
        """Each sequence's cached tokens, [B] int32 on the model's device."""
        return self.cache.lens

    @property
    def batch(self) -> int:
        return self.cache.batch_size

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Cache each sequence's tokens (ragged: one sequence at a time, eagerly; an empty one is
        skipped)."""
        if len(prompts) != self.batch:
            raise ValueError(f"prefill: {len(prompts)} prompts for a batch of {self.batch}")
        if self._fused is not None:
            self._fill(prompts)
            return
        for b, tokens in enumerate(prompts):
            if tokens:
                ids = torch.tensor([list(tokens)], device=self.device)
                self.model(ids, self.cache.sequence(b))

    def _fill(self, prompts: Sequence[Sequence[int]]) -> None:
        """The fused prefill: only the cache writes (no logits, no layers after the last that
        writes K/V). Prompts of one length go in one call (which itself goes one sequence at a
        time where a batched pass would compute a row differently), ragged ones one at a time."""
        c = self.cache
        lengths = [len(t) for t in prompts]
        c._check_room(lengths)  # the eager path's error, before any write
        if len(set(lengths)) == 1:
            parts = [(c, prompts)] if prompts[0] else []
        else:
            parts = [(c.sequence(b), [t]) for b, t in enumerate(prompts) if t]
        try:
            for cache, tokens in parts:
                ids = torch.tensor([list(t) for t in tokens])  # [B', S]
                self._fused.fill(ids, cache.k, cache.v, cache.lens)
        finally:
            c.set_lens(c.lens.clone())  # moved in place: the host copy is stale

    def __call__(self, ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(probs [B, S, V] or None, greedy tokens [B, S] or None) for ids [B, S]."""
        if self._fused is not None:  # one C++ call, no autograd: no inference-mode context
            c = self.cache
            if self.sampling.greedy:
                return None, self._fused.greedy(ids.long(), c.k, c.v, c.lens)
            logits = self._fused.logits(ids.long(), c.k, c.v, c.lens)  # [B, S, V] fp32
            if self.sampling.logits:
                return logits, None
            # A window's softmax on ATen's OpenMP team left a team thread spinning on the core
            # the next fused step's pool wanted: 37% of a sampled speculative decode's perf
            # samples. On one thread the softmax takes as long (9 us for [1, 3, 4096]) and
            # sampled speculative decoding ran 2.3x faster (bench/NOTES.md v19). The count is
            # the calling thread's own OpenMP setting; toggling it costs well under a microsecond.
            with num_threads(1):
                return _outputs(logits, self.sampling)
        return self._call(ids)

    @torch.inference_mode()
    def _call(self, ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if self.backend == "eager":
            return _step(self.model, ids, self.cache, self.sampling)
        if self.backend == "compile":
            ids = ids.reshape(-1).view(ids.shape)  # row-major strides, which the graph guards
            if ids.shape[1] > 1 and ids.shape[1] not in self._warm:
                torch._dynamo.mark_dynamic(ids, 1)  # one graph for every window width > 1
                self._warm.add(ids.shape[1])
            return self._compiled(self.model, ids, self.cache, self.sampling)
        return self._replay(ids)

    @property
    def drafts_in_one_call(self) -> bool:
        """Whether ``draft`` runs a draft's γ greedy steps as one call (the fused backend)."""
        return self._fused is not None and self.sampling.greedy

    @property
    def samples_in_one_call(self) -> bool:
        """Whether the fused C++ loops draw this runner's sampled tokens themselves (the fused
        backend, sampling; ``sampler`` makes their sampler)."""
        return self._fused is not None and not self.sampling.greedy and not self.sampling.logits

    def sampler(self, generator: torch.Generator | None = None) -> torch.ScriptObject:
        """The fused loops' sampler (``torch.classes.pearlmoe.CpuSampler``) for this runner's
        temperature, top-k and top-p, its random stream seeded by one draw from ``generator``
        (torch's default one when None), so a seeded decode repeats."""
        s = self.sampling
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        top_k = s.top_k if s.top_k is not None and s.top_k > 0 else 0
        top_p = s.top_p if s.top_p is not None and 0 < s.top_p < 1 else 1.0
        return torch.classes.pearlmoe.CpuSampler(s.temperature, top_k, top_p, seed)

    @property
    def fused_step(self) -> torch.ScriptObject | None:
        """The fused backend's C++ step (``torch.classes.pearlmoe.CpuModelStep``), else None."""
        return self._fused

    def draft(self, feed: Tensor, n: int) -> Tensor:
        """n greedy tokens [B, n] after feed [B, w], in one call; the lengths advance by
        w + n - 1 (``drafts_in_one_call`` runners only)."""
        c = self.cache
        return self._fused.draft(feed.long(), c.k, c.v, c.lens, n)

    def warmup(self, widths: Sequence[int]) -> float:
        """Build the steps for these window widths now (compile or capture), on scratch tokens
        past the cached ones (the lengths are restored; the scratch K/V lie past them); returns
        the seconds it took. Nothing to do for the eager and fused backends."""
        if self.backend in ("eager", "fused"):
            return 0.0
        start = time.perf_counter()
        # Width classes that are new to this process (S = 1, S > 1), for the progress note.
        classes = {(id(self.model), self.backend, self.sampling, torch.get_num_threads(),
                    self.batch, min(w, 2)) for w in widths}  # fmt: skip
        if notify is not None and not classes <= _built:
            what = "compiling" if self.backend == "compile" else "capturing CUDA graphs of"
            notify(f"{what} the {self.model.config.model_type} decode step "
                   f"(widths {sorted(set(widths))}, batch {self.batch})")  # fmt: skip
        _built.update(classes)
        lens = self.lens.clone()
        with torch.inference_mode():
            for width in sorted(set(widths)):
                if int(lens.max()) + width <= self.cache.capacity:
                    self(torch.zeros(self.batch, width, dtype=torch.long, device=self.device))
            self.lens.copy_(lens)
        return time.perf_counter() - start

    def _replay(self, ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
        width = ids.shape[1]
        if width not in self._graphs:
            self._capture(width)
        graph, ids_buf, outputs = self._graphs[width]
        ids_buf.copy_(ids, non_blocking=True)
        graph.replay()
        return outputs

    def _capture(self, width: int) -> None:
        ids_buf = torch.zeros(self.batch, width, dtype=torch.long, device=self.device)
        lens = self.lens.clone()
        # Warm up on a side stream (allocator pools, lazy inits) as torch.cuda.graphs advises.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                _step(self.model, ids_buf, self.cache, self.sampling)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = _step(self.model, ids_buf, self.cache, self.sampling)
        self.lens.copy_(lens)
        self._graphs[width] = (graph, ids_buf, outputs)


_compiled_steps: "weakref.WeakKeyDictionary[Transformer, Callable]" = weakref.WeakKeyDictionary()


def _compiled_step(model: Transformer) -> Callable:
    """torch.compile of _step for one model. Each model gets its own copy of the function's code:
    dynamo keeps its compiled graphs per code object and tries them in turn, so a shared one
    would make the draft's step check the target's guards first (~100 us a call measured)."""
    if model not in _compiled_steps:
        # A few graphs per model: S = 1 and S > 1, greedy and sampled, a few batch sizes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        code = _step.__code__.replace(co_name=f"_step_{len(_compiled_steps)}")
        fn = types.FunctionType(code, _step.__globals__, code.co_name)
        options = {"cpp_wrapper": True} if model.device.type == "cpu" else {}
        options["guard_filter_fn"] = _skip_weight_guards
        _compiled_steps[model] = torch.compile(fn, fullgraph=True, options=options)
    return _compiled_steps[model]


# Guards that re-check the model's own structure on every call: the hooks dicts of every module,
# the absence of instance attributes, tensor aliasing among the weights, the types inside
# _modules and _parameters. A model's structure follows from its config, which the kept guards
# pin (CONSTANT_MATCH on its values, DICT_KEYS_MATCH on the layer list), as the KV cache's tensors
# pin its dtype and device; hooks added after the first call are not seen by the compiled step.
_STRUCTURE_GUARDS = {"EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT", "DUPLICATE_INPUT"}


def _skip_weight_guards(entries) -> list[bool]:
    """Every guard but the per-weight shape/dtype/stride checks and the module-structure checks
    (~250 guards on the embedded draft, ~60 us a call): the weights are still read from the model
    at every call, so another model of the same config runs with its own."""
    keep = []
    for e in entries:
        weight = e.guard_type == "TENSOR_MATCH" and (
            isinstance(e.value, torch.nn.Parameter) or e.name.endswith("qweight']")
        )
        internals = e.guard_type == "TYPE_MATCH" and any(
            part in e.name for part in ("._modules", "._param", "._buffers")
        )
        keep.append(not (weight or internals or e.guard_type in _STRUCTURE_GUARDS))
    return keep
