"""LlamaGen teacher sampler benchmark on a GPU (CUDA only): CUDA-graph vs eager equality and teacher-forced parity on
the tiny configs, then LlamaGen-L parity and sampler timings (random weights, VQ decode timed apart).

Writes ``$OUT/llamagen_samplers.json``; the figures are in docs/results.md (GPU teacher samplers).

    OUT=runs/bench python jobs/gpu_llamagen_samplers.py
"""

import json
import os
import time
from dataclasses import replace

import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig
from dd2dist.teachers.llamagen import LlamaGenTeacher

dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def gen(s):
    return torch.Generator(device=dev).manual_seed(s)


def fin_diff(a, b):
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    return bool(torch.equal(fa, fb)), (a[fa] - b[fb]).abs().max().item()


# 1) correctness on tiny configs
C2I = LlamaGenConfig()
T2I = LlamaGenConfig(num_classes=0, cls_token_num=5, caption_dim=16)
for name, cfg in [("c2i", C2I), ("t2i", T2I), ("c2i_mlp", replace(C2I, input_adapter="mlp"))]:
    torch.manual_seed(0)
    t = LlamaGenTeacher(cfg).to(dev).freeze()
    if cfg.caption_dim:
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool, device=dev)
        cond = Cond(text=torch.randn(3, 5, 16, device=dev) * mask[..., None], text_mask=mask)
    else:
        cond = Cond(labels=torch.tensor([0, 3, 9], device=dev))
    s = Sampling(guidance_scale=2.0, top_k=20)
    ie, le = t.sample(cond, s, gen(0), return_log_probs=True, cuda_graph=False)
    ig, lg = t.sample(cond, s, gen(0), return_log_probs=True, cuda_graph=True)
    ok, d = fin_diff(lg, t.log_probs(ig, cond, s))
    ib = t.sample(cond, s, gen(0), dtype=torch.bfloat16)
    out[f"tiny_{name}"] = {
        "graph_ids_equal_eager": bool(torch.equal(ie, ig)),
        "graph_vs_eager_lp": fin_diff(le, lg)[1],
        "tf_parity_same_mask": ok,
        "tf_parity_maxdiff": d,
        "bf16_ids_in_range": bool((ib >= 0).all() and (ib < 64).all()),
    }
    print(name, out[f"tiny_{name}"], flush=True)

# 2) LlamaGen-L (random weights, true size)
cfg = OFFICIAL_ARCHS["llamagen_l"]
torch.manual_seed(0)
with torch.device(dev):
    t = LlamaGenTeacher(cfg)
t.freeze()
cond2 = Cond(labels=torch.tensor([1, 207], device=dev))
for nm, smp in [("raw", Sampling(guidance_scale=1.0)), ("cfg2", Sampling(guidance_scale=2.0)),
                ("cfg2_topk900", t.default_sampling)]:
    ids, lp = t.sample(cond2, smp, gen(1), return_log_probs=True)
    ref = t.log_probs(ids, cond2, smp)
    fa, fb = torch.isfinite(lp), torch.isfinite(ref)
    both = fa & fb
    out[f"L_tf_parity_{nm}"] = {
        "filter_mismatches": int((fa != fb).sum()),
        "kept": int(fa.sum()),
        "maxdiff_on_common": (lp[both] - ref[both]).abs().max().item(),
    }
    print("L parity", nm, out[f"L_tf_parity_{nm}"], flush=True)
idsb, lpb = t.sample(cond2, None, gen(1), return_log_probs=True, dtype=torch.bfloat16)
ref = t.log_probs(idsb, cond2, t.default_sampling)
out["L_bf16_vs_fp32_prob_maxdiff"] = (lpb.exp() - ref.exp()).abs().max().item()
print("bf16 prob diff", out["L_bf16_vs_fp32_prob_maxdiff"], flush=True)


def timed(B, dtype, graph, reps=2):
    cond = Cond(labels=torch.randint(0, 1000, (B,), device=dev))
    t.sample(cond, None, gen(2), dtype=dtype, cuda_graph=graph)  # warm-up (incl. capture, bf16 copy)
    times = []
    for r in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t.sample(cond, None, gen(3 + r), dtype=dtype, cuda_graph=graph)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


rows = []
for B, dtype, graph in [
    (16, torch.float32, False),
    (16, torch.bfloat16, False),
    (16, torch.float32, True),
    (16, torch.bfloat16, True),
    (1, torch.bfloat16, True),
    (64, torch.bfloat16, True),
    (256, torch.bfloat16, True),
    (256, torch.float32, True),
]:
    sec = timed(B, dtype, graph)
    rows.append(
        {
            "B": B,
            "dtype": str(dtype).split(".")[-1],
            "cuda_graph": graph,
            "s_per_batch": sec,
            "s_per_image": sec / B,
            "images_per_s": B / sec,
        }
    )
    print(rows[-1], flush=True)
out["L_sampling_cfg2_topk900_no_vq_decode"] = rows
ids = torch.randint(0, 16384, (16, 256), device=dev)
with torch.no_grad():
    t.decode(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    img = t.decode(ids)
    torch.cuda.synchronize()
out["vq_decode_fp32_B16_s"] = time.perf_counter() - t0
out["vq_decode_shape"] = list(img.shape)
print("vq decode", out["vq_decode_fp32_B16_s"], img.shape)
out["max_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "llamagen_samplers.json"), "w"), indent=1)
print(json.dumps(out))
