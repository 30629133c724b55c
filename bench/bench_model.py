"""Model-level throughput: prefill and decode tokens/s of the transformer on pearlmoe's ops
against the same model on eager PyTorch ops (``reference_ops=True``), in one run.

CPU: a small Hunyuan-style config. GPU: a Hunyuan-Large-shaped slice (full-width layers:
H 6400, 80/8 heads of 80, 16 experts of 18304 top-1 + shared, CLA pairs), bf16.

    python bench/bench_model.py [--device cuda] [--layers 2]
"""

import argparse
import time

import torch

from common import device_name, median_seconds, print_table, write_json
from pearlmoe.model import ModelConfig, Transformer

SMALL = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, intermediate_size=512, num_experts=8, moe_topk=1, num_shared_expert=1,
    use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2, use_qk_norm=True,
)  # fmt: skip
HUNYUAN_SLICE = dict(
    vocab_size=128512, hidden_size=6400, num_attention_heads=80, num_key_value_heads=8,
    intermediate_size=18304, num_experts=16, moe_topk=1, num_shared_expert=1,
    use_mixed_mlp_moe=True, use_cla=True, cla_share_factor=2, use_qk_norm=True,
    rope_scaling={"type": "dynamic", "alpha": 100000.0, "factor": 1.0},
)  # fmt: skip


@torch.inference_mode()
def run(model: Transformer, device, batch: int, prompt: int, decode_steps: int, reference: bool):
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)

    def prefill():
        model(ids, model.new_cache(batch, prompt + decode_steps), reference_ops=reference)

    def decode():
        cache = model.new_cache(batch, prompt + decode_steps)
        model(ids, cache, reference_ops=reference)
        step = ids[:, -1:]
        start = time.perf_counter()
        for _ in range(decode_steps):
            model(step, cache, reference_ops=reference)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    prefill_s = median_seconds(prefill, device, 3)
    decode_s = sorted(decode() for _ in range(3))[1]
    return batch * prompt / prefill_s, batch * decode_steps / decode_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2, help="layers of the GPU slice")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        config = ModelConfig(**HUNYUAN_SLICE, num_hidden_layers=args.layers)
        dtype, shapes = torch.bfloat16, [(1, 512, 32), (8, 512, 32)]
    else:
        config, dtype, shapes = ModelConfig(**SMALL), torch.float32, [(1, 128, 32), (4, 128, 32)]
    torch.manual_seed(0)
    model = Transformer(config, dtype=dtype, device=device).eval()

    rows = []
    for batch, prompt, steps in shapes:
        ours = run(model, device, batch, prompt, steps, reference=False)
        eager = run(model, device, batch, prompt, steps, reference=True)
        rows.append({
            "batch": batch, "prompt": prompt,
            "prefill_tok_s": ours[0], "eager_prefill_tok_s": eager[0],
            "prefill_x": ours[0] / eager[0],
            "decode_tok_s": ours[1], "eager_decode_tok_s": eager[1],
            "decode_x": ours[1] / eager[1],
        })  # fmt: skip
    columns = [("batch", "d"), ("prompt", "d"), ("prefill_tok_s", ".0f"),
               ("eager_prefill_tok_s", ".0f"), ("prefill_x", ".2f"), ("decode_tok_s", ".1f"),
               ("eager_decode_tok_s", ".1f"), ("decode_x", ".2f")]  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")
    title = (f"model on {device_name(device)}: {config.num_hidden_layers} layers, "
             f"H={config.hidden_size}, E={config.num_experts}, {dtype_name}")  # fmt: skip
    print_table(title, rows, columns)
    path = write_json("model", device, {"config": config.to_dict(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
