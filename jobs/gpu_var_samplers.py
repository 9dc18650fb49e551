"""VAR teacher sampler benchmark on a GPU: forced-vs-cached parity, then sampler timings at the released sizes.

Random weights (sampling speed does not depend on them), bf16 timings of VAR-d16/d20/d24/d30 at batch 1 and 16, fp32
and bf16 parity of the KV-cached sampler against one teacher-forced pass. Writes ``$OUT/var_samplers.json``; the
figures are in docs/results.md (GPU teacher samplers). ``--quick`` runs the tiny config only (works on a CPU).

    OUT=runs/bench python jobs/gpu_var_samplers.py
"""

import json
import os
import sys
import time

import torch

from dd2dist.conditions import Cond, Sampling
from dd2dist.teachers.arch import OFFICIAL_ARCHS, VARConfig
from dd2dist.teachers.var import VARTeacher

quick = "--quick" in sys.argv
dev = "cuda" if torch.cuda.is_available() else "cpu"
out_dir = os.environ.get("OUT", "/tmp/var_bench_out")
os.makedirs(out_dir, exist_ok=True)
res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def log(msg):
    print(msg, flush=True)
    with open(os.path.join(out_dir, "var_samplers.json"), "w") as f:
        json.dump(res, f, indent=1)


def parity(cfg, name, batch, sampling, dtype=torch.float32):
    torch.manual_seed(0)
    with torch.device(dev):
        t = VARTeacher(cfg)
    t = t.to(dtype).freeze()
    cond = Cond(labels=torch.arange(batch, device=dev) % cfg.num_classes)
    g = torch.Generator(device=dev).manual_seed(0)
    ids, lp = t.sample(cond, sampling, g, return_log_probs=True)
    with torch.no_grad():
        lf = t.log_probs(ids, cond, sampling)
    fin = torch.isfinite(lp)
    same_set = torch.isfinite(lf) == fin
    both = fin & torch.isfinite(lf)
    r = {
        "max_abs_diff_finite": float((lp[both] - lf[both]).abs().max()),
        "kept_set_mismatch_fraction_of_rows": float((~same_set).any(-1).float().mean()),
        "mean_kept_codes": float(fin.sum(-1).float().mean()),
        "drawn_ids_kept_by_forced": bool(torch.isfinite(lf.gather(-1, ids[..., None])).all()),
    }
    res[f"parity_{name}"] = r
    log(f"parity {name}: {r}")
    del t


def timing(kind, cfg, batches, reps, dtype):
    torch.manual_seed(0)
    with torch.device(dev):
        t = VARTeacher(cfg)
    t = t.to(dtype).freeze()
    n_params = sum(p.numel() for p in t.transformer.parameters())
    s = t.default_sampling
    out = {"params_transformer": n_params, "sampling": repr(s), "dtype": str(dtype)}
    for B in batches:
        cond = Cond(labels=torch.arange(B, device=dev) % cfg.num_classes)
        g = torch.Generator(device=dev).manual_seed(0)
        for _ in range(2):  # warm-up
            ids = t.sample(cond, s, g)
            t.decode(ids)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            ids = t.sample(cond, s, g)
        sync()
        t_sample = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(reps):
                img = t.decode(ids)
        sync()
        t_dec = (time.perf_counter() - t0) / reps
        x = t.embed(ids)
        with torch.inference_mode():
            t.log_probs(x, cond, s)
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                t.log_probs(x, cond, s)
            sync()
        t_forced = (time.perf_counter() - t0) / reps
        out[f"batch{B}"] = {
            "sample_s_per_batch_excl_decode": t_sample,
            "s_per_image_excl_decode": t_sample / B,
            "decode_s_per_batch": t_dec,
            "s_per_image_incl_decode": (t_sample + t_dec) / B,
            "teacher_forced_cfg_pass_s_per_batch": t_forced,
            "img_shape": list(img.shape),
        }
        if dev == "cuda":
            out[f"batch{B}"]["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res[f"timing_{kind}"] = out
        log(f"timing {kind} B={B}: {out[f'batch{B}']}")
    del t
    if dev == "cuda":
        torch.cuda.empty_cache()


tiny = VARConfig()
parity(tiny, "tiny_fp32_cfg", 4, Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_k=20, top_p=0.9))
if quick:
    timing("tiny", tiny, [1, 4], 2, torch.float32)
else:
    d16 = OFFICIAL_ARCHS["var_d16"]
    parity(d16, "d16_fp32_default_sampling", 2,
           Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_k=900, top_p=0.95))
    parity(d16, "d16_fp32_no_cfg_no_filter", 2, Sampling(guidance_scale=0.0, guidance_schedule="var_linear"))
    parity(
        d16,
        "d16_bf16_default_sampling",
        2,
        Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_k=900, top_p=0.95),
        torch.bfloat16,
    )
    for kind in ("var_d16", "var_d20", "var_d24", "var_d30"):
        timing(kind, OFFICIAL_ARCHS[kind], [1, 16], 5, torch.bfloat16)
log("done")
