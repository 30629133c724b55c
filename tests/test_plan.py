"""`pearlmoe plan`: memory per GPU for Hunyuan-Large under EP / TP layouts, and its CLI."""

import pytest

from pearlmoe import cli
from pearlmoe.distributed.plan import parts, plan
from pearlmoe.model import ModelConfig
from pearlmoe.model.config import estimate

LARGE = ModelConfig.from_file(cli.CONFIGS / "hunyuan-large-instruct.json")


# Published totals / active parameters (billions) of the flagship configs `plan` knows by name,
# and whether the active count leaves out the embedding and head (Zhipu's GLM-4.5 figures do; the
# total there also leaves out the multi-token-prediction layer pearlmoe does not load).
PUBLISHED = {
    "hunyuan-large": (389, 52, False),
    "mixtral-8x7b": (46.7, 12.9, False),
    "qwen1.5-moe-a2.7b": (14.3, 2.7, False),
    "qwen3-30b-a3b": (30.5, 3.3, False),
    "qwen3-235b-a22b": (235, 22, False),
    "olmoe-1b-7b": (6.9, 1.3, False),
    "glm-4.5": (355, 32, True),
    "glm-4.5-air": (106, 12, True),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_builtin_configs_match_their_published_sizes(name):
    config = ModelConfig.from_file(cli.CONFIGS / f"{cli.BUILTIN[name] or name}.json")
    est = estimate(config)
    total, active, without_embeddings = PUBLISHED[name]
    p = parts(config)
    assert est.total_params / 1e9 == pytest.approx(total, rel=0.015)
    got_active = est.active_params - (p.embed if without_embeddings else 0)
    assert got_active / 1e9 == pytest.approx(active, rel=0.02)
    assert p.embed + p.attention + p.shared + p.routed == est.total_params


def test_parts_add_up_to_the_estimate():
    p = parts(LARGE)
    assert p.embed + p.attention + p.shared + p.routed == estimate(LARGE).total_params
    assert p.routed == 64 * 16 * 3 * 6400 * 18304


def test_hunyuan_large_on_8_and_16_h100s():
    total = estimate(LARGE).total_params
    by_layout = {r.layout: r for r in plan(LARGE, 8, 80, weight_bytes=2)}
    assert not any(r.fits for r in by_layout.values())  # 778 GB of bf16 weights > 8 × 80 GB
    assert by_layout["tp"].weights_per_gpu == pytest.approx(total * 2 / 8)
    fp8 = {r.layout: r for r in plan(LARGE, 8, 80, batch=8, weight_bytes=1)}
    assert fp8["tp"].fits and fp8["tp"].kv_per_token_per_gpu == 81920 / 8  # one KV head each
    assert fp8["ep"].kv_per_token_per_gpu == 81920 and fp8["ep"].sequences_per_gpu == 1
    p = parts(LARGE)
    assert fp8["ep"].weights_per_gpu == pytest.approx(
        p.embed + p.attention + p.shared + p.routed / 8
    )
    free = (80 - 4) * 1e9 - fp8["ep"].weights_per_gpu
    assert fp8["ep"].longest_context == int(free // 81920)
    sixteen = {r.layout: r for r in plan(LARGE, 16, 80, batch=16)}
    assert sixteen["tp"].fits and not sixteen["ep"].fits
    assert sixteen["tp"].kv_per_token_per_gpu == 81920 / 8  # 8 KV heads: no finer split
    assert sixteen["tp"].longest_context == LARGE.max_position_embeddings


def test_plan_cli(capsys):
    assert cli.main(["plan", "hunyuan-large", "--gpus", "16", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "388.7B parameters (51.3B active" in out and "does not fit" in out
    assert "48.6 GB" in out and "131,072 (max)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "no-such-model", "--gpus", "8", "--gpu-mem", "80"], "CONFIG no-such-model"),
        (["plan", "hunyuan-large", "--gpus", "0", "--gpu-mem", "80"], "--gpus"),
        (["plan", "hunyuan-large", "--gpus", "8", "--gpu-mem", "0"], "--gpu-mem"),
        (["plan", "hunyuan-large", "--gpus", "8"], "--gpu-mem"),
        (
            ["plan", "hunyuan-large", "--gpus", "8", "--gpu-mem", "80", "--weights", "fp4"],
            "--weights",
        ),
    ],
)
def test_plan_errors_are_one_line(capsys, args, message):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pearlmoe: error:") and message in err[0]


def test_a_plan_with_no_room_for_one_token_does_not_fit():
    # 16 GB of fp8 weights per GPU under tp; 16 + 4 reserved GB leave nothing for the cache.
    small = ModelConfig(vocab_size=1000, hidden_size=4096, num_hidden_layers=8,
                        num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                        num_experts=8, moe_topk=1)  # fmt: skip
    weights = parts(small)
    total = weights.embed + weights.attention + weights.shared + weights.routed
    gpu_mem = (total / 2 + 1) / 1e9 + 4  # 1 byte of cache room per GPU under tp on 2 GPUs
    tp = {r.layout: r for r in plan(small, 2, gpu_mem, weight_bytes=1)}["tp"]
    assert tp.kv_capacity == 0 and tp.longest_context == 0 and not tp.fits
