"""The compressed KV cache: GQA heads only, one buffer per CLA group of layers.

Hunyuan-Large shares K/V across each pair of adjacent layers (CLA) and keeps 8 KV heads for 80
query heads (GQA). With QK-norm after RoPE the layers of a pair still differ in their key-norm
weights, so the cache stores the rotated, RMS-normalised key without any weight (``k_hat`` from
``ops.rope_qk_norm``) once per pair, and each layer folds its key-norm weight into its query.
That is 2 · kv_heads · head_dim · (layers / cla_share_factor) values per token: 81,920 bytes in
bf16 for Hunyuan-Large, half of what a per-layer cache holds.

Shape letters: G cache groups (layers / cla_share_factor), B sequences, C capacity (tokens per
sequence), Hkv KV heads, D head dim, S new tokens in a step.
"""

import math

import torch
from torch import Tensor

from .. import ops


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """torch.zeros, on a CPU on one thread: zeroing a cache is an ATen OpenMP region, after which
    ATen's idle team spins for milliseconds beside the fused steps' own pool (measured:
    speculative decoding at batch 4 at ~0.8x until these were serial)."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    finally:
        torch.set_num_threads(threads)


class KVCache:
    """Preallocated K/V buffers with per-sequence lengths, for a batch of sequences.

    The lengths live on the cache's device (``lens``, int32 [B]), so a decode step reads and
    writes the cache with index ops and no host work (``Transformer.step``); the decode loops move
    them with tensor ops (``set_lens``). A host copy is kept while it is known for free, so the
    eager interface below can check capacity without a device sync::

        k_buf, v_buf = cache.write(layer, k_hat, v, num_new)    # first layer of a CLA group
        o = attention(q, k_buf, v_buf, cache.kv_lens(num_new))  # every layer

    and then ``cache.advance(num_new)`` once. A step over S new tokens may be left-padded when
    sequences bring different numbers (``num_new[b] <= S``: sequence b's real rows are its last
    ``num_new[b]``). ``truncate`` rolls sequences back (speculative decoding rejects drafts); it
    only moves the lengths, so it is O(1).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        cla_share_factor: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        sizes = (num_layers, batch_size, capacity, kv_heads, head_dim, cla_share_factor)
        if any(not isinstance(n, int) or isinstance(n, bool) for n in sizes) or min(sizes) < 1:
            raise ValueError(f"KVCache: every size must be a positive int, got {sizes}")
        self.num_layers, self.cla_share_factor = num_layers, cla_share_factor
        self.capacity = capacity
        groups = math.ceil(num_layers / cla_share_factor)
        shape = (groups, batch_size, capacity, kv_heads, head_dim)
        self.k = _zeros(shape, dtype, device)  # [G, B, C, Hkv, D]
        self.v = _zeros(shape, dtype, device)  # [G, B, C, Hkv, D]
        self.lens = torch.zeros(batch_size, dtype=torch.int32, device=device)  # [B]
        self._lens: list[int] | None = [0] * batch_size  # host copy; None once only lens knows
        self._batch = batch_size

    @staticmethod
    def bytes_per_token(
        num_layers: int, kv_heads: int, head_dim: int, cla_share_factor: int = 1,
        dtype: torch.dtype = torch.bfloat16,
    ) -> int:  # fmt: skip
        """2 · kv_heads · head_dim · ceil(layers / cla_share_factor) · dtype size."""
        groups = math.ceil(num_layers / cla_share_factor)
        return 2 * kv_heads * head_dim * groups * torch.tensor([], dtype=dtype).element_size()

    @property
    def batch_size(self) -> int:
        return self._batch

    def group(self, layer: int) -> int:
        """The cache group of a layer; layers of one CLA group read the same buffers."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"KVCache: layer {layer} out of range [0, {self.num_layers})")
        return layer // self.cla_share_factor

    def owns_kv(self, layer: int) -> bool:
        """Whether the layer writes K/V (the first layer of its CLA group) or reuses them."""
        return layer % self.cla_share_factor == 0

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """The K/V buffers a layer attends over: [B, C, Hkv, D] each."""
        g = self.group(layer)
        return self.k[g], self.v[g]

    # ---- host-checked interface (prefill, tests, eager forwards) ------------------------------

    def _num_new(self, num_new: Tensor | list[int] | int | None, steps: int) -> list[int]:
        if num_new is None:
            return [steps] * self.batch_size
        if isinstance(num_new, bool) or not isinstance(num_new, int | list | tuple | Tensor):
            raise TypeError(f"KVCache: num_new must be an int, a list or a tensor, got {num_new!r}")
        if isinstance(num_new, int):
            counts = [num_new] * self.batch_size
        else:
            counts = [int(n) for n in num_new]
        if len(counts) != self.batch_size or any(n < 0 or n > steps for n in counts):
            raise ValueError(
                f"KVCache: num_new must give 0..{steps} new tokens for each of the "
                f"{self.batch_size} sequences, got {counts}"
            )
        return counts

    def seq_lens(self) -> list[int]:
        """Each sequence's length (one device sync when only the device copy knows them)."""
        if self._lens is None:
            self._lens = [int(n) for n in self.lens.tolist()]
        return list(self._lens)

    def _check_room(self, counts: list[int]) -> None:
        for b, (length, n) in enumerate(zip(self.seq_lens(), counts, strict=True)):
            if length + n > self.capacity:
                raise RuntimeError(
                    f"KVCache: sequence {b} would hold {length + n} tokens, past the cache's "
                    f"capacity of {self.capacity}"
                )

    def positions(self, steps: int, num_new: Tensor | list[int] | int | None = None) -> Tensor:
        """Absolute positions of the S (left-padded) new tokens: [B, S] int64. Sequence b's real
        rows are its last num_new[b]; padding rows get clamped positions (their outputs are
        ignored)."""
        counts = torch.tensor(self._num_new(num_new, steps), device=self.lens.device)  # [B]
        rows = torch.arange(steps, device=self.lens.device)  # [S]
        pos = self.lens.long().unsqueeze(1) + rows - (steps - counts).unsqueeze(1)  # [B, S]
        return pos.clamp(min=0)

    def write(
        self, layer: int, k_hat: Tensor, v: Tensor, num_new: Tensor | list[int] | int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Store the new tokens' keys and values (the last ``num_new[b]`` of the S rows of each
        sequence) after each sequence's current length; returns the group's buffers
        ``[B, C, Hkv, D]`` for attention. Call it for the first layer of each CLA group."""
        g = self.group(layer)
        if k_hat.dim() != 4 or k_hat.shape != v.shape or k_hat.shape[0] != self.batch_size:
            raise ValueError(
                f"KVCache: k_hat and v must both be [B={self.batch_size}, S, Hkv, D], got "
                f"{tuple(k_hat.shape)} and {tuple(v.shape)}"
            )
        if k_hat.shape[2:] != self.k.shape[3:]:
            raise ValueError(
                f"KVCache: k_hat and v must have {self.k.shape[3]} heads of {self.k.shape[4]}, "
                f"got {tuple(k_hat.shape)}"
            )
        steps = k_hat.shape[1]
        counts = self._num_new(num_new, steps)
        self._check_room(counts)
        positions = self.positions(steps, counts)  # [B, S]
        if any(n < steps for n in counts):  # padding rows write back what their slot holds
            real = torch.arange(steps, device=positions.device) >= torch.tensor(
                [steps - n for n in counts], device=positions.device
            ).unsqueeze(1)  # [B, S]
            rows = torch.arange(self.batch_size, device=positions.device).unsqueeze(1)
            mask = real[..., None, None]
            k_hat = torch.where(mask, k_hat, self.k[g][rows, positions])
            v = torch.where(mask, v, self.v[g][rows, positions])
        self.write_at(layer, k_hat, v, positions)
        return self.k[g], self.v[g]

    def kv_lens(self, num_new: Tensor | list[int] | int = 0) -> Tensor:
        """Valid keys per sequence while attending for the pending new tokens: [B] int32 on the
        cache's device."""
        counts = self._num_new(num_new, self.capacity)
        return self.lens + torch.tensor(counts, dtype=torch.int32, device=self.lens.device)

    def advance(self, num_new: Tensor | list[int] | int) -> None:
        """Commit the step's new tokens (after every layer has written and attended)."""
        counts = self._num_new(num_new, self.capacity)
        self._check_room(counts)
        self._set([n + c for n, c in zip(self.seq_lens(), counts, strict=True)])

    def truncate(self, lens: Tensor | list[int]) -> None:
        """Roll sequences back to the given lengths (each no longer than it is now)."""
        new = [int(n) for n in lens]
        old = self.seq_lens()
        if len(new) != self.batch_size or any(
            not 0 <= n <= o for n, o in zip(new, old, strict=True)
        ):
            raise ValueError(f"KVCache: cannot truncate lengths {old} to {new}")
        self._set(new)

    def sequence(self, b: int) -> "KVCache":
        """A one-sequence cache over this cache's buffers: prompts of different lengths are
        prefilled one at a time, then decoded as a batch."""
        if not 0 <= b < self.batch_size:
            raise IndexError(f"KVCache: sequence {b} out of range [0, {self.batch_size})")
        return self.rows(b, b + 1)

    def rows(self, begin: int, end: int) -> "KVCache":
        """A cache over sequences begin..end-1 of this one's buffers (views: writes and length
        updates reach this cache): a server steps over only the slots in use."""
        if not 0 <= begin < end <= self.batch_size:
            raise IndexError(f"KVCache: rows {begin}..{end} out of range [0, {self.batch_size}]")
        view = object.__new__(KVCache)
        view.num_layers, view.cla_share_factor = self.num_layers, self.cla_share_factor
        view.capacity, view._batch = self.capacity, end - begin
        view.k, view.v = self.k[:, begin:end], self.v[:, begin:end]  # [G, n, C, Hkv, D] views
        view.lens = self.lens[begin:end]
        view._lens = self.seq_lens()[begin:end] if self._lens is not None else None
        view._parent = (self, begin)
        return view

    def _set(self, lens: list[int]) -> None:
        self._lens = lens
        self.lens.copy_(torch.tensor(lens, dtype=torch.int32))
        parent = getattr(self, "_parent", None)
        if parent is not None and parent[0]._lens is not None:
            parent[0]._lens[parent[1] : parent[1] + len(lens)] = lens

    # ---- device-side interface (the static decode step and the decode loops) -----------------

    def write_at(self, layer: int, k_hat: Tensor, v: Tensor, positions: Tensor) -> None:
        """Store k_hat, v [B, S, Hkv, D] at positions [B, S] (int64): index writes, no checks and
        no host work, so a compiled or graph-captured step can do it. Positions must be below the
        capacity."""
        ops.kv_cache_write(self.k, self.v, k_hat, v, positions, layer // self.cla_share_factor)

    def set_lens(self, lens: Tensor) -> None:
        """Set every sequence's length from a device tensor [B] (no sync; the host copy is
        dropped until ``seq_lens`` asks for it)."""
        self.lens.copy_(lens)
        self._lens = None
        parent = getattr(self, "_parent", None)
        if parent is not None:
            parent[0]._lens = None
