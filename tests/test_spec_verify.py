"""spec_verify: exact one-hot cases, structural invariants, agreement with the reference on the
same uniforms, a statistical losslessness test over millions of draws, and bad input."""

import pytest
import torch

import pearlmoe
from conftest import DEVICES, HAS_CUDA
from pearlmoe import reference


def _random_probs(shape, g, zeros=0.3):
    p = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) > zeros)
    p[..., 0] += 1e-3  # never an all-zero row
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_one_hot(device):
    # Target argmaxes: row0 -> 3, row1 -> 1, row2 -> 4, row3 (bonus) -> 2.
    target = torch.zeros(2, 4, 5)
    for i, t in enumerate([3, 1, 4, 2]):
        target[:, i, t] = 1.0
    drafts = torch.tensor([[3, 1, 4], [3, 0, 4]])
    tokens, accepted = pearlmoe.spec_verify(target.to(device), drafts.to(device))
    assert tokens.tolist() == [[3, 1, 4, 2], [3, 1, -1, -1]]  # all + bonus; reject at 1, correct
    assert accepted.tolist() == [3, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_one_hot_is_deterministic(device):
    target = torch.zeros(1, 3, 4)
    target[0, 0, 2] = target[0, 1, 0] = target[0, 2, 3] = 1.0
    draft = torch.zeros(1, 2, 4)
    draft[0, 0, 2] = 1.0  # agrees: p/q = 1, always accepted
    draft[0, 1, 1] = 1.0  # disagrees: p(x) = 0, always rejected; residual = the target's one-hot
    tokens, accepted = pearlmoe.spec_verify(
        target.to(device), torch.tensor([[2, 1]]).to(device), draft.to(device)
    )
    assert tokens.tolist() == [[2, 0, -1]] and accepted.tolist() == [1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy", [True, False])
def test_matches_reference_and_invariants(device, greedy):
    g = torch.Generator().manual_seed(int(greedy))
    batch, n, vocab = 64, 5, 33
    target = _random_probs((batch, n + 1, vocab), g)
    draft = None if greedy else _random_probs((batch, n, vocab), g)
    drafts = (
        torch.multinomial(draft.reshape(-1, vocab), 1, generator=g).view(batch, n)
        if draft is not None
        else torch.randint(0, vocab, (batch, n), generator=g)
    )
    if greedy:  # make acceptance likely for a prefix
        drafts[:, :3] = target[:, :3].argmax(-1)
    uniforms = None if greedy else torch.rand(batch, n + 1, generator=g)
    args = [t if t is None else t.to(device) for t in (target, drafts, draft, uniforms)]
    tokens, accepted = torch.ops.pearlmoe.spec_verify(*args)
    want_tokens, want_accepted = reference.spec_verify(target, drafts, draft, uniforms)
    assert torch.equal(tokens.cpu(), want_tokens) and torch.equal(accepted.cpu(), want_accepted)
    for b in range(batch):
        a = int(accepted[b])
        assert torch.equal(tokens[b, :a].cpu(), drafts[b, :a])  # accepted prefix = the drafts
        assert 0 <= int(tokens[b, a]) < vocab  # one correction / bonus token
        assert (tokens[b, a + 1 :] == -1).all()  # nothing after the first rejection


def test_lossless_statistics():
    """Over 2M draws the emitted tokens follow the target distribution at every position."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 6, 2
    p = torch.tensor(
        [
            [0.4, 0.0, 0.1, 0.2, 0.3, 0.0],
            [0.05, 0.15, 0.3, 0.0, 0.1, 0.4],
            [0.2, 0.2, 0.1, 0.1, 0.2, 0.2],
        ]
    )
    q = torch.tensor(
        [[0.1, 0.3, 0.1, 0.0, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]]
    )  # zeros in both
    counts = torch.zeros(n + 1, vocab)
    for _ in range(4):
        batch = 500_000
        drafts = torch.stack(
            [torch.multinomial(q[i], batch, replacement=True, generator=g) for i in range(n)], 1
        )
        target = p.expand(batch, n + 1, vocab)
        tokens, _ = pearlmoe.spec_verify(target, drafts, q.expand(batch, n, vocab), generator=g)
        for i in range(n + 1):
            emitted = tokens[:, i][tokens[:, i] >= 0]
            counts[i] += torch.bincount(emitted, minlength=vocab)
    for i in range(n + 1):
        freq = counts[i] / counts[i].sum()
        assert (freq - p[i]).abs().sum() < 5e-3, (i, freq, p[i])  # total variation ~1e-3 expected
        assert counts[i].sum() > 1e5


def test_reproducible_with_generator():
    g = torch.Generator().manual_seed(3)
    target, draft = _random_probs((16, 4, 20), g), _random_probs((16, 3, 20), g)
    drafts = torch.randint(0, 20, (16, 3), generator=g)
    runs = [
        pearlmoe.spec_verify(target, drafts, draft, generator=torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")
@pytest.mark.cuda
def test_cuda_matches_cpu_large_vocab():
    g = torch.Generator().manual_seed(5)
    target, draft = _random_probs((8, 5, 129_024), g), _random_probs((8, 4, 129_024), g)
    drafts, uniforms = torch.randint(0, 129_024, (8, 4), generator=g), torch.rand(8, 5, generator=g)
    drafts[:, 0] = target[:, 0].argmax(-1)
    for d in (None, draft):
        u = None if d is None else uniforms
        cpu = torch.ops.pearlmoe.spec_verify(target, drafts, d, u)
        gpu = torch.ops.pearlmoe.spec_verify(
            target.cuda(),
            drafts.cuda(),
            None if d is None else d.cuda(),
            None if u is None else u.cuda(),
        )
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(target=torch.full((2, 3, 4), float("nan"))), r"target_probs contains NaN"),
        (dict(target=-torch.ones(2, 3, 4)), r"target_probs contains negative probabilities"),
        (dict(draft=torch.full((2, 2, 4), float("nan"))), r"draft_probs contains NaN"),
        (dict(drafts=torch.tensor([[0, 4], [1, 1]])), r"draft_ids must be in \[0, V=4\)"),
        (dict(drafts=torch.zeros(2, 3, dtype=torch.long)), r"target_probs must be \[B, n\+1, V\]"),
        (dict(target=torch.rand(2, 3, 4).double()), r"target_probs must be Float, got Double"),
        (dict(draft=torch.rand(2, 2, 5)), r"draft_probs must be \[B, n, V\] = \[2, 2, 4\]"),
    ],
    ids=["nan", "negative", "draft-nan", "id-range", "rows", "dtype", "draft-shape"],
)
def test_bad_input(change, match):
    args = dict(
        target=torch.rand(2, 3, 4), drafts=torch.tensor([[0, 1], [2, 3]]), draft=torch.rand(2, 2, 4)
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.spec_verify: " + match):
        pearlmoe.spec_verify(args["target"], args["drafts"], args["draft"])


# ---- issue 13: rows without mass (items 1, 6), zero drafts (7), value checks ---------------------


@pytest.mark.parametrize(
    ("where", "greedy"),
    [("target-rejected-row", True), ("target-bonus-row", True), ("target-rejected-row", False),
     ("target-bonus-row", False), ("draft-row", False)],
)  # fmt: skip
def test_rows_without_mass_are_an_error(where, greedy):
    """Item 1: a row without mass used to pass the checks (the CPU twin then recursed forever on
    it, the GPU returned token 0); now the op names the argument and the row."""
    target, draft = torch.full((2, 3, 4), 0.25), torch.full((2, 2, 4), 0.25)
    rows = {"target-rejected-row": ("target_probs", target, (1, 0)),
            "target-bonus-row": ("target_probs", target, (0, 2)), "draft-row": ("draft_probs", draft, (1, 1))}  # fmt: skip
    name, t, (b, i) = rows[where]
    t[b, i] = 0
    with pytest.raises(
        RuntimeError, match=rf"pearlmoe\.spec_verify: {name}\[{b}, {i}\] has no probability mass"
    ):
        pearlmoe.spec_verify(
            target,
            torch.tensor([[1, 2], [3, 0]]),
            None if greedy else draft,
            torch.Generator().manual_seed(0),
        )


def test_issue_hang_case_returns_an_error():
    """Item 6's reproduction hung forever (the CPU twin recursed on a zero-mass row); in a
    subprocess with a timeout, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    code = (
        "import torch, pearlmoe\n"
        "try:\n"
        "    pearlmoe.spec_verify(torch.zeros(1, 2, 4), torch.tensor([[1]]), torch.full((1, 1, 4), 0.25),"
        " generator=torch.Generator().manual_seed(0))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pearlmoe.spec_verify: target_probs[0, 0] has no probability mass" in done.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_zero_drafts_with_draft_probs_sample_the_bonus(device):
    """Item 7: with n = 0 and draft_probs given, the bonus token is sampled (an empty
    draft_probs used to be read as greedy and return the argmax)."""
    target = torch.tensor([[[0.1, 0.9]], [[0.6, 0.4]]], device=device)
    draft = torch.empty(2, 0, 2, device=device)
    uniforms = torch.tensor([[0.05], [0.99]], device=device)  # inverse CDF: token 0, token 1
    tokens, accepted = torch.ops.pearlmoe.spec_verify(
        target, torch.empty(2, 0, dtype=torch.long, device=device), draft, uniforms
    )
    assert tokens.tolist() == [[0], [1]] and accepted.tolist() == [0, 0]  # argmax would be 1, 0
    want = reference.spec_verify(
        target.cpu(), torch.empty(2, 0, dtype=torch.long), draft.cpu(), uniforms.cpu()
    )
    assert torch.equal(tokens.cpu(), want[0])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            dict(target=torch.full((2, 3, 4), float("inf"))),
            r"target_probs contains inf \(row \[0, 0\]\)",
        ),
        (
            dict(uniforms=torch.tensor([[0.1, 0.2, 1.0], [0.0, 0.5, 0.5]])),
            r"uniforms must be in \[0, 1\), got uniforms\[0, 2\] = 1",
        ),
        (
            dict(uniforms=torch.tensor([[0.1, 0.2, 0.3], [0.0, float("nan"), 0.5]])),
            r"uniforms must be in \[0, 1\), got uniforms\[1, 1\] = nan",
        ),
        (
            dict(drafts=torch.tensor([[0, 1], [-1, 1]])),
            r"draft_ids must be in \[0, V=4\), got draft_ids\[1, 0\] = -1",
        ),
        (dict(draft=None), r"uniforms given without draft_probs"),
    ],
    ids=["inf", "u=1", "u-nan", "id=-1", "uniforms-greedy"],
)
def test_bad_values_name_the_argument(change, match):
    args = dict(
        target=torch.full((2, 3, 4), 0.25),
        drafts=torch.tensor([[0, 1], [2, 3]]),
        draft=torch.full((2, 2, 4), 0.25),
        uniforms=torch.rand(2, 3),
    )
    args.update(change)
    with pytest.raises(RuntimeError, match=r"pearlmoe\.spec_verify: " + match):
        torch.ops.pearlmoe.spec_verify(
            args["target"], args["drafts"], args["draft"], args["uniforms"]
        )


def test_strided_inputs_are_checked_as_read():
    """Item 8's class: the values checked are those of the view, not of its storage."""
    storage = torch.full((2, 6, 4), 0.25)
    storage[:, 1::2] = float("nan")  # between the rows of the view: never read
    tokens, _ = pearlmoe.spec_verify(storage[:, ::2], torch.tensor([[0, 1], [2, 3]]))
    assert tokens.shape == (2, 3)
    storage[1, 4] = 0  # a row of the view
    with pytest.raises(RuntimeError, match=r"target_probs\[1, 2\] has no probability mass"):
        pearlmoe.spec_verify(storage[:, ::2], torch.tensor([[0, 1], [2, 3]]))


@pytest.mark.parametrize(
    ("target", "drafts", "match"),
    [
        (torch.rand(4), torch.tensor([[1]]), r"target_probs must be 3-D, got shape \[4\]"),
        (torch.rand(1, 2, 4), torch.tensor([1]), r"draft_ids must be 2-D, got shape \[1\]"),
        (torch.rand(1, 3, 4), torch.tensor([[1]]), r"target_probs must be \[B, n\+1, V\]"),
    ],
    ids=["1-D-target", "1-D-drafts", "rows"],
)
def test_wrapper_checks_before_drawing_uniforms(target, drafts, match):
    """Issue 13 item 10: the wrapper unpacked target_probs' shape before any check (a 1-D input
    gave 'not enough values to unpack')."""
    with pytest.raises(RuntimeError, match=r"pearlmoe\.spec_verify: " + match):
        pearlmoe.spec_verify(target, drafts, torch.rand(1, 1, 4), torch.Generator().manual_seed(0))
