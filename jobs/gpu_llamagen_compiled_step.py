"""LlamaGen-L sampler with a ``torch.compile``-d decode step on a GPU (CUDA only): parity against eager bf16 and the
fp32 teacher-forced pass, and timings with and without the compiled step (random weights, bf16, CUDA graph on).

Writes ``$OUT/llamagen_compiled_step.json``; the figures are in docs/results.md (GPU teacher samplers).

    OUT=runs/bench python jobs/gpu_llamagen_compiled_step.py
"""

import json
import os
import time

import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.teachers.arch import OFFICIAL_ARCHS
from dd2dist.teachers.llamagen import LlamaGenTeacher

dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def gen(s):
    return torch.Generator(device=dev).manual_seed(s)


cfg = OFFICIAL_ARCHS["llamagen_l"]
torch.manual_seed(0)
with torch.device(dev):
    t = LlamaGenTeacher(cfg)
t.freeze()


def timed(B, compile_step, reps=3):
    cond = Cond(labels=torch.randint(0, 1000, (B,), device=dev))
    t0 = time.perf_counter()
    t.sample(cond, None, gen(2), dtype=torch.bfloat16, compile_step=compile_step)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = []
    for r in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t.sample(cond, None, gen(3 + r), dtype=torch.bfloat16, compile_step=compile_step)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = {
        "B": B,
        "compile_step": compile_step,
        "first_call_s": first,
        "s_per_batch": min(times),
        "s_per_image": min(times) / B,
        "images_per_s": B / min(times),
    }
    print(row, flush=True)
    return row


rows = [timed(16, False), timed(1, False)]
cond = Cond(labels=torch.randint(0, 1000, (16,), device=dev))
s = Sampling(guidance_scale=2.0)
ids, lp = t.sample(cond, s, gen(1), return_log_probs=True, dtype=torch.bfloat16, compile_step=True)
ids_e, lp_e = t.sample(cond, s, gen(1), return_log_probs=True, dtype=torch.bfloat16)
ref = t.log_probs(ids, cond, s)
out["compiled_bf16_vs_fp32_tf_prob_maxdiff"] = (lp.exp() - ref.exp()).abs().max().item()
out["eager_bf16_vs_fp32_tf_prob_maxdiff"] = (lp_e.exp() - t.log_probs(ids_e, cond, s).exp()).abs().max().item()
out["compiled_ids_equal_eager_frac"] = (ids == ids_e).float().mean().item()
print(out, flush=True)
rows += [timed(16, True), timed(1, True)]
out["L_bf16_graph_cfg2_topk900"] = rows
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "llamagen_compiled_step.json"), "w"), indent=1)
