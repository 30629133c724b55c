"""The `pearlmoe` command and the embedded pair it defaults to: generation end to end (greedy PEARL
and speculative output equal greedy autoregressive output), bench, info, one-line errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pearlmoe import cli
from pearlmoe.model import ModelConfig, from_pretrained
from pearlmoe.model.config import estimate
from pearlmoe.train.presets import EMBEDDED, PRESETS, held_out_metrics

TARGET, DRAFT = EMBEDDED / "tiny-target", EMBEDDED / "tiny-draft"
PROMPT = "def read_config(path):\n    "


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pearlmoe.cli", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def run_main(args: list[str], capsys) -> tuple[int, str]:
    """`pearlmoe ARGS` in this process (argparse exits with SystemExit): (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


# ---- the embedded pair --------------------------------------------------------------------------


def test_embedded_pair_is_small_bf16_and_matches_its_presets():
    total = sum(f.stat().st_size for d in (TARGET, DRAFT) for f in d.iterdir())
    assert total < 25 * 2**20, f"embedded pair is {total / 2**20:.1f} MiB"
    for directory, name in ((TARGET, "tiny-target"), (DRAFT, "tiny-draft")):
        assert ModelConfig.from_file(directory) == PRESETS[name].config
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
            assert "BF16" in dtypes and dtypes <= {"BF16", "F32"}  # F32: the routers
        report = json.loads((directory / "training.json").read_text())
        assert report["preset"] == name and report["train"]["steps"] == PRESETS[name].train.steps
    target, draft = PRESETS["tiny-target"].config, PRESETS["tiny-draft"].config
    # The target is Hunyuan-Large scaled down; the draft a dense model about a tenth its size.
    assert target.is_moe and target.shared_intermediate_size and target.use_cla
    assert target.use_qk_norm and target.num_key_value_heads < target.num_attention_heads
    assert not draft.is_moe
    ratio = estimate(draft).total_params / estimate(target).total_params
    assert 0.05 < ratio < 0.15
    assert cli.load_tokenizer(TARGET).to_str() == cli.load_tokenizer(DRAFT).to_str()


def test_embedded_pair_agrees_and_target_is_better():
    tokenizer = cli.load_tokenizer(TARGET)
    target = from_pretrained(TARGET, dtype=torch.float32)
    draft = from_pretrained(DRAFT, dtype=torch.float32)
    prompts = cli.held_out_prompts(tokenizer, 4, 129)
    tokens = torch.tensor([t for p in prompts for t in p])
    metrics = held_out_metrics(target, tokens, windows=4, seq_len=128, other=draft)
    draft_nll = held_out_metrics(draft, tokens, windows=4, seq_len=128)["held_out_nll"]
    assert metrics["greedy_agreement"] > 0.4  # chance is 1/4096
    assert metrics["held_out_nll"] < draft_nll


# ---- generate ---------------------------------------------------------------------------------------


def test_greedy_pearl_and_speculative_equal_autoregressive_on_the_embedded_pair():
    tokenizer = cli.load_tokenizer(TARGET)
    target = from_pretrained(TARGET, dtype=torch.float32)
    draft = from_pretrained(DRAFT, dtype=torch.float32)
    prompt = tokenizer.encode(PROMPT).ids
    ar, _ = cli.decode("ar", target, None, prompt, 40, None, 0.0, None, 0)
    for mode in ("speculative", "pearl"):
        for gamma in (2, 5):
            out, stats = cli.decode(mode, target, draft, prompt, 40, gamma, 0.0, None, 0)
            assert out == ar, (mode, gamma)
            assert stats["mean_accepted_tokens"] > 1.0


def test_generate_end_to_end_pearl_output_equals_ar():
    outputs = {}
    for mode in ("pearl", "ar"):
        done = run_cli("generate", PROMPT, "--mode", mode, "--max-new-tokens", "32",
                       "--gamma", "3", "--device", "cpu")  # fmt: skip
        assert done.returncode == 0, done.stderr
        text, _, stats = done.stdout.rpartition("\n\n[")
        assert text.startswith(PROMPT) and len(text) > len(PROMPT)
        assert "tokens/s" in stats
        outputs[mode] = text
        assert ("tokens per target call" in stats) == (mode == "pearl")
    assert outputs["pearl"] == outputs["ar"]


def test_generate_prints_pearl_statistics(capsys):
    rc = cli.main(["generate", "import os\n", "--max-new-tokens", "12", "--gamma", "2",
                   "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"\[pearl\] \d+ tokens in [\d.]+ s: [\d.]+ tokens/s, gamma 2,", out)
    assert "tokens per target call" in out and "acceptance rate" in out


def test_generate_vs_ar_alternates_pairs(capsys, monkeypatch):
    """--vs-ar times VS_AR_PAIRS pairs of decodes in alternating order after the streamed one
    and prints the median of their ratios with its range."""
    calls = []
    decode = cli.decode

    def spy(mode, *args, **kwargs):
        calls.append(mode)
        return decode(mode, *args, **kwargs)

    monkeypatch.setattr(cli, "decode", spy)
    rc = cli.main(["generate", "import os\n", "--max-new-tokens", "8", "--gamma", "2",
                   "--device", "cpu", "--vs-ar"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    pairs = cli.VS_AR_PAIRS
    timed = calls[-2 * pairs :]
    assert timed == ["pearl", "ar", "ar", "pearl"] * (pairs // 2) + ["pearl", "ar"] * (pairs % 2)
    found = re.search(rf"same run, {pairs} alternating pairs: pearl is ([\d.]+)x autoregressive "
                      r"\(median; ([\d.]+)-([\d.]+)x\)", out)  # fmt: skip
    assert found, out
    median, low, high = map(float, found.groups())
    assert 0 < low <= median <= high


def test_generate_takes_the_gate_setting(capsys):
    """--gate on gates even one sequence (the loop may take plain steps; the text stays AR's)."""
    texts = {}
    for mode, gate in (("ar", "auto"), ("pearl", "on"), ("speculative", "on")):
        rc = cli.main(["generate", "def f(x):", "--max-new-tokens", "24", "--mode", mode,
                       "--gate", gate, "--device", "cpu"])  # fmt: skip
        assert rc == 0
        texts[mode] = capsys.readouterr().out.rpartition("\n\n[")[0]
    assert texts["pearl"] == texts["speculative"] == texts["ar"]
    assert cli.main(["generate", "x", "--gate", "sometimes"]) == 2
    assert "argument --gate: invalid choice: 'sometimes'" in capsys.readouterr().err


def test_sampled_auto_mode_measures_the_modes_and_runs_the_fastest(capsys, monkeypatch):
    """--mode auto with sampling decodes the prompt in each mode and runs the fastest measured
    (the greedy-step cost curve does not see a sampled round's host work)."""
    measured = {"ar": 900.0, "speculative": 400.0, "pearl": 500.0}
    seen = []

    def fake_decode(mode, target, draft, prompt, max_new_tokens, *args, **kwargs):
        seen.append((mode, max_new_tokens))
        stats = {"tokens_per_second": measured[mode]}
        return [1] * max_new_tokens, stats | ({"gamma": 2} if mode != "ar" else {})

    monkeypatch.setattr(cli, "decode", fake_decode)
    target = from_pretrained(TARGET, dtype=torch.float32)
    mode, rates = cli.probe_modes(target, target, [5, 6, 7], "fused", 1.0, None, 0)
    assert mode == "ar" and rates["ar"] == (0, 900.0) and rates["pearl"] == (2, 500.0)
    # every mode warmed up on a few tokens, then measured on PROBE_TOKENS
    assert [m for m, n in seen if n == cli.PROBE_TOKENS] == ["ar", "speculative", "pearl"]
    monkeypatch.undo()
    rc = cli.main(["generate", "def f(x):", "--max-new-tokens", "8", "--mode", "auto",
                   "--temperature", "1.0", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    note = re.search(
        rf"mode auto: measured over {cli.PROBE_TOKENS} sampled tokens/s ar (\d+), "
        r"speculative (\d+).*, pearl (\d+).*; running (\w+)",
        captured.err,
    )
    assert note, captured.err
    rates = dict(zip(cli.MODES, map(int, note.groups()[:3]), strict=True))
    assert rates[note.group(4)] == max(rates.values())
    assert f"[{note.group(4)}]" in captured.out


def test_sampled_generation_is_reproducible_with_a_seed(capsys):
    args = ["generate", "class ", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7",
            "--max-new-tokens", "16", "--mode", "speculative", "--gamma", "3", "--device", "cpu"]  # fmt: skip
    texts = []
    for _ in range(2):
        assert cli.main(args) == 0
        texts.append(capsys.readouterr().out.rpartition("\n\n[")[0])
    assert texts[0] == texts[1]


# ---- info and bench ---------------------------------------------------------------------------------


def test_info_prints_config_and_sizes(capsys):
    assert cli.main(["info", str(TARGET)]) == 0
    out = capsys.readouterr().out
    est = estimate(ModelConfig.from_file(TARGET))
    assert f"({est.total_params:,})" in out and f"({est.active_params:,})" in out
    assert f"{est.kv_bytes_per_token:,} bytes" in out and "num_experts" in out


@pytest.mark.parametrize("name", ["glm-4.5", "qwen3-235b-a22b", "mixtral-8x7b"])
def test_info_knows_the_builtin_flagship_configs(name, capsys):
    assert cli.main(["info", name]) == 0
    est = estimate(ModelConfig.from_file(cli.CONFIGS / f"{name}.json"))
    assert f"({est.total_params:,})" in capsys.readouterr().out


def test_bench_writes_json_and_png(tmp_path, capsys):
    rc = cli.main(["bench", "--prompts", "1", "--prompt-tokens", "16", "--max-new-tokens", "8",
                   "--batch", "2", "--dtypes", "float32", "--backend", "eager",
                   "--device", "cpu", "--out", str(tmp_path), "--repeats", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads((tmp_path / "pearlmoe_bench.json").read_text())
    (run,) = result["runs"]
    assert set(run["modes"]) == {"ar-eager", "ar", "speculative", "pearl"}
    assert run["greedy_outputs_identical"] is True and run["compiled_equals_eager"] is True
    assert run["modes"]["ar"]["speedup_vs_ar"] == 1.0 and result["batch"] == 2
    assert run["modes"]["ar"]["paired_vs_ar"] == {"geomean": 1.0, "p10": 1.0, "p90": 1.0}
    assert result["lookup"] == 3 and result["gate"] == "auto"  # the defaults, recorded
    assert result["repeats"] == 2
    assert run["modes"]["ar"]["tokens"] == 2 * 2 * 8  # two passes over a batch of two
    assert run["modes"]["pearl"]["plain_share"] == 0.0  # eager steps: nothing to gate
    assert len(run["cost_curve"]["target_ms"]) == 9 and run["cost_curve"]["draft_ms"] > 0
    assert run["cost_curve_context"] == 16 + 8 // 2  # a decode's midpoint: prompt + half the new
    for mode in ("speculative", "pearl"):  # γ chosen from the curve, with a prediction
        assert run["modes"][mode]["gammas"] and run["modes"][mode]["predicted_tokens_per_second"]
    assert run["modes"]["pearl"]["overlap"] > 0
    for mode in ("speculative", "pearl"):
        row = run["modes"][mode]
        assert row["ceiling_vs_ar"]["ratio"] > 0
        # the draft model's own acceptance, what it allows, and what the batch goal would need
        assert 0 <= row["model_acceptance_rate"] <= 1
        assert row["model_only_vs_ar"]["alpha"] == row["model_acceptance_rate"]
        tested = row["model_drafts_tested"]  # the rate is a count's ratio
        kept = row["model_acceptance_rate"] * tested
        assert (
            isinstance(tested, int)
            and 0 <= round(kept) <= tested
            and abs(kept - round(kept)) < 1e-6
        )
        assert row["model_only_vs_ar"]["ratio"] > 0 and row["goal_vs_ar"]["ratio"] == 1.2
        # the counterfactual: a window at one step's cost never allows less
        assert row["flat_verification_vs_ar"]["ratio"] >= row["model_only_vs_ar"]["ratio"] - 1e-9
        need = row["goal_vs_ar"]["alpha_needed"]
        assert need is None or 0 <= need <= 1
        assert f"{mode}: the draft model's own alpha" in captured.out
        assert "a window at one step's cost would allow" in captured.out
    assert run["modes"]["pearl"]["paired_vs_speculative"]["geomean"] > 0
    assert "pearl over speculative (paired):" in captured.out
    assert "target step ms by window (after 20 cached tokens)" in captured.out
    assert (tmp_path / "pearlmoe_bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_summary_counts_the_model_drafts_and_splits_the_sides():
    """A speculative row's acceptance rests on the decodes' tested drafts, summed, and its time
    split is the sides' seconds over the decodes' (the C++ rounds record both)."""
    from pearlmoe.decode import DecodeStats
    from pearlmoe.decode_bench import summarize

    def decode(tested, kept, draft_s, target_s, seconds):
        extra = {"model_drafts": [tested, kept], "side_seconds": [draft_s, target_s],
                 "side_scales": (1.0, 1.0), "round_host_seconds": 0.0}  # fmt: skip
        return DecodeStats(target_calls=4, proposed=8, accepted=6, emitted=10, seconds=seconds,
                           gamma=2, extra=extra)  # fmt: skip

    row = summarize(
        "speculative", 20, 2.0, [decode(6, 3, 0.1, 0.5, 1.0), decode(2, 2, 0.3, 0.3, 1.0)]
    )
    assert row["model_drafts_tested"] == 8 and row["model_acceptance_rate"] == 5 / 8
    assert row["side_shares"] == pytest.approx({"draft": 0.2, "target": 0.4})
    plain = decode(6, 3, 0.1, 0.5, 1.0)
    del plain.extra["side_seconds"]  # a loop that does not time its sides apart: no split
    assert "side_shares" not in summarize("speculative", 10, 1.0, [plain])


# ---- errors: one line, non-zero exit, no traceback ----------------------------------------------


def _incompatible_draft(tmp_path: Path) -> Path:
    draft = tmp_path / "draft"
    shutil.copytree(DRAFT, draft)
    spec = json.loads((draft / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, different mapping
    (draft / "tokenizer.json").write_text(json.dumps(spec))
    return draft


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["generate", "x", "--target", "/nonexistent/model"],
            "--target /nonexistent/model: no such",
        ),
        (["generate", "x", "--draft", "/nonexistent/d"], "--draft /nonexistent/d: no such"),
        (["generate", "x", "--gamma", "0"], "--gamma: expected a positive integer"),
        (["generate", "x", "--gamma", "16"], "--gamma: expected at most 15"),
        (["generate", "x", "--lookup", "-1"], "--lookup: expected an integer >= 0, got -1"),
        (["bench", "--lookup", "two"], "--lookup: expected an integer >= 0, got 'two'"),
        (["generate", "x", "--temperature", "-1"], "--temperature: expected a number >= 0"),
        (["generate", "x", "--top-p", "1.5"], "--top-p: expected a probability"),
        (["generate", "x", "--mode", "beam"], "invalid choice: 'beam'"),
        (["generate", "x", "--device", "tpu"], "--device"),
        (["generate"], "required: PROMPT"),
        (["frob"], "invalid choice: 'frob'"),
        (["info", "/nonexistent/model"], "/nonexistent/model does not exist"),
        (["generate", "", "--device", "cpu"], "PROMPT is empty"),
    ],
)
def test_errors_are_one_line(args, message, capsys):
    # In-process: the subprocess tests below cover the entry point.
    code, err = run_main(args, capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pearlmoe: error:") and message in lines[0]


def test_incompatible_tokenizers_and_corrupt_checkpoint_are_one_line(tmp_path):
    done = run_cli(
        "generate", "x", "--draft", str(_incompatible_draft(tmp_path)), "--device", "cpu"
    )
    assert done.returncode == 2 and "incompatible tokenizers" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    shutil.copytree(TARGET, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    done = run_cli("generate", "x", "--target", str(broken), "--mode", "ar", "--device", "cpu")
    assert done.returncode == 2 and "not a readable safetensors file" in done.stderr
    assert "Traceback" not in done.stderr


def test_cuda_device_refused_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    done = run_cli("generate", "x", "--device", "cuda")
    assert done.returncode == 2 and "CUDA is not available" in done.stderr


def test_runtime_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("pearlmoe.attention: kv_lens must be <= capacity\nmore detail")

    monkeypatch.setattr(cli, "decode", boom)
    args = ["generate", "x", "--mode", "ar", "--device", "cpu"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pearlmoe: error: pearlmoe.attention: kv_lens must be <= capacity "
                   "(PEARLMOE_DEBUG=1 shows the traceback)"]  # fmt: skip
    monkeypatch.setenv("PEARLMOE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kv_lens"):
        cli.main(args)


def test_malformed_configs_and_impossible_bench_are_one_line(tmp_path, capsys):
    (tmp_path / "partial.json").write_text('{"model_type": "llama"}')
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 0, "intermediate_size": 4,
    }))  # fmt: skip
    cases = [
        (
            ["plan", str(tmp_path / "partial.json"), "--gpus", "2", "--gpu-mem", "8"],
            "missing 6 required",
        ),
        (["info", str(tmp_path / "list.json")], "must hold a JSON object"),
        (["info", str(tmp_path / "zero")], "num_key_value_heads must be a positive integer"),
        (
            ["bench", "--prompt-tokens", "100000000", "--device", "cpu"],
            "too few held-out files are that long",
        ),
    ]
    for args, message in cases:
        code, err = run_main(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)


def test_paired_ratio_is_the_geomean_of_per_batch_ratios():
    from pearlmoe.decode_bench import paired_ratio

    got = paired_ratio([2.0, 8.0, 3.0], [1.0, 2.0, 3.0])  # ratios 2, 4, 1
    assert got["geomean"] == pytest.approx(2.0) and (got["p10"], got["p90"]) == (1.0, 4.0)
