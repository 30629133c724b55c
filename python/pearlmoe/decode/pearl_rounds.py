"""PEARL's round bookkeeping: after both sides of a round, verify each sequence's window,
commit what was accepted, switch its mode and move both caches' lengths (pearlmoe.decode.pearl
explains the modes). Two implementations of one interface:

  DeviceRounds  the state as tensors on the model's device, updated by tensor ops with one host
                read per round (on a GPU they queue behind the steps); greedy rounds as one
                compiled call with the CPU compile backend; the only one that samples.
  HostRounds    greedy, state as Python ints: a round reads the two sides' tokens and does the
                arithmetic on the host. On a CPU there is no device to keep busy, and a round's
                tensor ops (~60, or one compiled call) cost 60-100 us each round with the caches
                cold from the steps between them, against ~20 us here (bench/NOTES.md).

Both return each round's rows for the loop, [was_post, verified, accepted, kept, *emitted], and
keep the caches' invariants: target = committed[:-1]; draft = committed[:-1] (pre-verify) or
committed + unverified[:-1] (post-verify).

Shape letters: B sequences, γ window, G the largest γ, V vocabulary.
"""

import torch
from torch import Tensor

from .. import ops
from .common import pad, round_fn, stand_ins

PRE, POST = 0, 1


def _sampled_verify(
    mode: Tensor, window: Tensor, p: Tensor, q: Tensor, gamma: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Accepted counts [B] and correction tokens [B] for windows [B, γ] whose sequence b has
    n_b = 1 (pre-verify) or γ (post-verify) real tokens, by rejection sampling against the
    target's rows p [B, ≥n_b, V] and the draft's q [B, γ, V]. There is no bonus token in PEARL:
    when all n_b are accepted the correction is unused."""
    batch = window.shape[0]
    # Sampling: spec_verify over each mode's sequences (their windows have one length); the last
    # row duplicated gives the op its n+1 rows, and a bonus it samples is dropped.
    accepted = torch.zeros(batch, dtype=torch.long, device=window.device)
    corr = torch.zeros(batch, dtype=torch.long, device=window.device)
    for m, width in ((PRE, 1), (POST, gamma)):
        idx = (mode == m).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        rows = p[idx, :width]  # [b, n, V]
        tokens, acc = ops.spec_verify(
            torch.cat([rows, rows[:, -1:]], 1), window[idx, :width], q[idx, :width], generator
        )
        accepted[idx] = acc.long()
        corr[idx] = tokens.gather(1, acc.long().clamp(max=width - 1).unsqueeze(1)).squeeze(1)
    return accepted, corr


def _windows(mode: Tensor, unverified: Tensor, xs: Tensor, gamma: int) -> Tensor:
    """The tokens each sequence's round verifies, [B, γ]: e_2..e_γ, f_1 (post-verify) or e_1
    (pre-verify, repeated as padding)."""
    post = (mode == POST).unsqueeze(1)
    return torch.where(post, torch.cat([unverified, xs[:, :1]], 1), xs[:, :1].expand(-1, gamma))


def _commit(
    mode: Tensor, unverified: Tensor, last: Tensor, committed: Tensor, active: Tensor,
    window: Tensor, shifted: Tensor, accepted: Tensor, corr: Tensor, t0: Tensor, d_now: Tensor,
    d0: Tensor, gamma: Tensor | int,
) -> tuple[Tensor, ...]:  # fmt: skip
    """A verified round's new state: mode, unverified, last, committed [B], both sides' cache
    lengths [B] int32, and the rows the host reads, [B, 4 + w] for windows [B, w]: was-post,
    tokens verified, accepted, tokens kept, emitted tokens. ``shifted`` (unverified's shape)
    holds f_2..f_γ, the unverified tokens of a sequence that stays in post-verify. Sequences not
    active keep their state."""
    post = mode == POST
    n = torch.where(post, gamma, 1)
    all_in = accepted == n
    # Commit the accepted window tokens, then the correction unless all were accepted.
    kept = torch.where(all_in, n, accepted + 1)
    cols = torch.arange(window.shape[1], device=window.device)
    emitted = torch.where(cols < accepted.unsqueeze(1), window, corr.unsqueeze(1))
    new_last = torch.where(all_in, window.gather(1, (n - 1).unsqueeze(1)).squeeze(1), corr)
    new_committed = committed + kept
    # All accepted: the target keeps what it fed (its cache = committed[:-1]) and the draft all
    # it drafted (committed + unverified[:-1]); else both roll back to the new committed[:-1].
    stay = active & all_in
    t_lens = torch.where(stay, t0 + n, torch.where(active, new_committed - 1, t0))
    d_lens = torch.where(stay, d_now, torch.where(active, new_committed - 1, d0))
    unverified = torch.where(stay.unsqueeze(1), shifted, unverified)
    last = torch.where(active, new_last, last)
    committed = torch.where(active, new_committed, committed)
    mode = torch.where(active, torch.where(all_in, POST, PRE), mode)
    host = torch.cat([post.long().unsqueeze(1), n.long().unsqueeze(1),
                      accepted.unsqueeze(1), kept.unsqueeze(1), emitted], 1)  # fmt: skip
    return mode, unverified, last, committed, t_lens.int(), d_lens.int(), host


def _greedy_round(
    mode: Tensor, unverified: Tensor, last: Tensor, committed: Tensor, active: Tensor,
    xs: Tensor, target_tokens: Tensor, t0: Tensor, d_now: Tensor, d0: Tensor, gamma: Tensor,
) -> tuple[Tensor, ...]:  # fmt: skip
    """Greedy verification and commit of a round, on buffers of a fixed width G (the policy's
    largest γ) with γ a 0-d tensor: the shapes never change within a decode, so the compile
    backend runs the round's ~60 small ops as one call that never recompiles when γ does.

    unverified [B, G] (e_2..e_γ in its first γ-1 columns), xs [B, G] (the draft's γ tokens
    first), target_tokens [B, G] (the target's argmax over the window, ≥ 1 real column); the
    rest as in ``_commit``, whose host rows this returns at width 4 + G."""
    cols = torch.arange(xs.shape[1], device=xs.device)
    post = mode == POST
    n = torch.where(post, gamma, 1)  # [B] real tokens in each window
    # e_2..e_γ, f_1 (post-verify) or e_1 (pre-verify; only its first column is read).
    window = torch.where(post.unsqueeze(1) & (cols < gamma - 1), unverified, xs[:, :1])
    match = (window == target_tokens) & (cols < n.unsqueeze(1))
    accepted = match.long().cumprod(1).sum(1)  # [B]
    corr = target_tokens.gather(1, torch.minimum(accepted, n - 1).unsqueeze(1)).squeeze(1)
    # f_2..f_γ shifted left (the last column is never read).
    return _commit(mode, unverified, last, committed, active, window, torch.roll(xs, -1, 1),
                   accepted, corr, t0, d_now, d0, gamma)  # fmt: skip


class DeviceRounds:
    """The round state as tensors on the device (see the module docstring)."""

    def __init__(
        self, prompts: list[list[int]], device: torch.device, width_g: int, gamma: int,
        greedy: bool, backend: str, tgt, drf, generator: torch.Generator | None,
    ) -> None:  # fmt: skip
        batch = len(prompts)
        self.device, self.width_g, self.greedy, self.generator = device, width_g, greedy, generator
        self.tgt, self.drf = tgt, drf
        self.last = torch.tensor([p[-1] for p in prompts], device=device)  # [B] committed[-1]
        self.committed = torch.tensor([len(p) for p in prompts], device=device)  # [B]
        self.mode = torch.full((batch,), PRE, device=device)  # [B]
        self.unverified = torch.zeros(batch, width_g, dtype=torch.long, device=device)  # [B, G]
        self.unverified_q = None  # [B, γ-1, V]: their draft distributions, when sampling
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # [B]
        self.bookkeep = round_fn(_greedy_round, device, backend) if greedy else None
        self.set_gamma(gamma)

    def warmup(self) -> None:
        """Compile the greedy bookkeeping now. Distinct contiguous tensors like the loop's: a
        strided or aliased stand-in would compile a graph whose guards every later round then
        fails first (~65 us a call)."""
        if self.bookkeep is None or self.bookkeep is _greedy_round:
            return
        row, ids, lens = stand_ins(len(self.last), self.width_g, self.device)
        self.bookkeep(row(), ids(), row(), row(), row() == 0, ids(), ids(), lens(), lens(),
                      lens(), self.gamma_t)  # fmt: skip

    def set_gamma(self, gamma: int) -> None:
        """A new window, between rounds with nothing unverified."""
        self.gamma = gamma
        self.gamma_t = torch.tensor(gamma, device=self.device)
        self.unverified_q = None

    def first(self) -> Tensor:
        """[B] the token the draft feeds first: its cache lacks e_γ (post-verify) or the last
        committed token (pre-verify, or post-verify at γ = 1)."""
        post = (self.mode == POST) & (self.gamma > 1)
        return torch.where(post, self.unverified[:, max(self.gamma - 2, 0)], self.last)

    def feed(self, width: int) -> Tensor:
        """[B, width] the target's tokens: [last, e_2..e_γ] (post-verify) or [last] (right-
        padded)."""
        return torch.cat([self.last.unsqueeze(1), self.unverified], 1)[:, :width]

    def begin(self) -> None:
        """Before the sides run: the lengths to keep for sequences that are done."""
        self.t0, self.d0 = self.tgt.lens.clone(), self.drf.lens.clone()

    def commit(
        self, xs: Tensor, qs: Tensor | None, p: Tensor | None, target_tokens: Tensor | None
    ) -> list[list[int]]:
        """Verify and commit a round: xs [B, γ] drafted (qs [B, γ, V] their distributions when
        sampling), the target's argmax [B, width] or its distributions p [B, width, V]."""
        gamma, device, width_g = self.gamma, self.device, self.width_g
        xs = xs.to(device)
        d_now, d0 = self.drf.lens.to(device), self.d0.to(device)
        if self.greedy:
            state = (self.mode, self.unverified, self.last, self.committed, self.active)
            out = self.bookkeep(*state, pad(xs, width_g), pad(target_tokens, width_g), self.t0,
                                d_now, d0, self.gamma_t)  # fmt: skip
            self.mode, self.unverified, self.last, self.committed, t_lens, d_lens, host = out
        else:
            mode, unverified = self.mode, self.unverified[:, : gamma - 1]
            window = _windows(mode, unverified, xs, gamma)
            qs = qs.to(device)
            first_q = qs[:, :1]
            pre_q = first_q.expand(-1, gamma, -1)
            post_q = (
                pre_q if self.unverified_q is None else torch.cat([self.unverified_q, first_q], 1)
            )
            q = torch.where((mode == POST).view(-1, 1, 1), post_q, pre_q)  # [B, γ, V]
            accepted, corr = _sampled_verify(mode, window, p, q, gamma, self.generator)
            go_post = self.active & (accepted == torch.where(mode == POST, gamma, 1))
            if gamma > 1:
                keep_q = self.unverified_q if self.unverified_q is not None else qs[:, 1:]
                self.unverified_q = torch.where(go_post.view(-1, 1, 1), qs[:, 1:], keep_q)
            self.mode, kept, self.last, self.committed, t_lens, d_lens, host = _commit(
                mode, unverified, self.last, self.committed, self.active, window, xs[:, 1:],
                accepted, corr, self.t0, d_now, d0, gamma,
            )  # fmt: skip
            self.unverified = pad(kept, width_g)
        self.tgt.lens.copy_(t_lens)
        self.drf.lens.copy_(d_lens.to(self.drf.device))
        return host.tolist()  # the round's one host sync: modes, counts, emitted tokens

    def finish(self, b: int) -> None:
        """Sequence b is done: frozen in pre-verify on what is committed."""
        self.active[b] = False
        self.mode[b] = PRE
        self.tgt.lens[b] = self.committed[b] - 1
        self.drf.lens[b] = self.committed[b] - 1


class HostRounds:
    """Greedy rounds with the state as Python ints (see the module docstring). The target's
    and the draft's lengths are mirrored here and written to their tensors once a round."""

    def __init__(self, prompts: list[list[int]], gamma: int, tgt, drf) -> None:
        self.tgt, self.drf = tgt, drf
        self.last = [p[-1] for p in prompts]
        self.committed = [len(p) for p in prompts]
        self.post = [False] * len(prompts)
        self.unverified: list[list[int]] = [[] for _ in prompts]  # e_2..e_γ
        self.active = [True] * len(prompts)
        self.t_lens = tgt.lens.tolist()
        self.d_lens = drf.lens.tolist()
        # Writable views of both sides' CPU lengths: ~0.3 us a write instead of ~5 us for a
        # tensor copy (None on other devices).
        self._views = [lens.numpy() if lens.device.type == "cpu" else None
                       for lens in (tgt.lens, drf.lens)]  # fmt: skip
        self.gamma = gamma

    def warmup(self) -> None:
        pass

    def set_gamma(self, gamma: int) -> None:
        self.gamma = gamma

    def first(self) -> Tensor:
        state = zip(self.post, self.unverified, self.last, strict=True)
        return torch.tensor([u[-1] if post and u else last for post, u, last in state])

    def feed(self, width: int) -> Tensor:
        rows = [([last] + u + [0] * width)[:width]
                for last, u in zip(self.last, self.unverified, strict=True)]  # fmt: skip
        return torch.tensor(rows, device=self.tgt.device)

    def begin(self) -> None:
        pass

    def commit(
        self, xs: Tensor, qs: Tensor | None, p: Tensor | None, target_tokens: Tensor
    ) -> list[list[int]]:
        gamma, rows = self.gamma, []
        for b, (drafted, scored) in enumerate(
            zip(xs.tolist(), target_tokens.tolist(), strict=True)
        ):
            was_post = self.post[b]
            n = gamma if was_post else 1
            window = (self.unverified[b] + drafted[:1]) if was_post else drafted[:1]
            accepted = 0
            while accepted < n and window[accepted] == scored[accepted]:
                accepted += 1
            all_in = accepted == n
            kept = n if all_in else accepted + 1
            emitted = window[:n] if all_in else [*window[:accepted], scored[accepted]]
            rows.append([int(was_post), n, accepted, kept, *emitted])
            if not self.active[b]:
                continue
            self.committed[b] += kept
            self.last[b] = emitted[-1]
            if all_in:  # the target keeps what it fed, the draft all it drafted
                self.t_lens[b] += n
                self.d_lens[b] += gamma
                self.unverified[b] = drafted[1:]
            else:  # both roll back to the new committed[:-1]
                self.t_lens[b] = self.d_lens[b] = self.committed[b] - 1
            self.post[b] = all_in
        self._write_lens()
        return rows

    def finish(self, b: int) -> None:
        self.active[b] = False
        self.post[b] = False
        self.t_lens[b] = self.d_lens[b] = self.committed[b] - 1
        self._write_lens()

    def _write_lens(self) -> None:
        for view, values, side in zip(self._views, (self.t_lens, self.d_lens), (self.tgt, self.drf),
                                      strict=True):  # fmt: skip
            if view is not None:
                view[:] = values
            else:
                side.lens.copy_(torch.tensor(values, dtype=torch.int32))
