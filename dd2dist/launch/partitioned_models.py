"""Building the teacher and the initial student straight from a teacher file without any rank holding the whole
teacher: the teacher partitioned under ZeRO-3 as it is constructed, the student read tensor by tensor.

This composes the model families (``dd2dist.teachers``, ``dd2dist.nets``) with the engine layer's partitioning
and state loading, which is why it lives here and not in ``dd2dist.engine``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dd2dist.engine.ds_config import frozen_ds_config, precision_dtype
from dd2dist.engine.process_group import ensure_distributed, worker_device
from dd2dist.engine.state_loading import LazyStateDict, load_state_module_by_module


def build_partitioned_teacher(teacher_cfg, state_path: str, *, precision: str = "fp32", use_gpu: bool = False):
    """The teacher of ``teacher_cfg`` built under ``deepspeed.zero.Init`` and loaded from ``state_path``.

    Each sub-module's parameters are partitioned right after its construction, then the weights are copied in
    module by module (:func:`~dd2dist.engine.state_loading.load_state_module_by_module`), so no rank holds the
    full teacher at any point. ``state_path`` is a dd2dist teacher state dict (torch file, ``{"teacher": sd}`` or
    a raw state dict, or a ``.safetensors`` file). Returns the frozen, partitioned module (wrap it with
    :class:`~dd2dist.engine.deepspeed_frozen.DeepSpeedFrozenEngine`).
    """
    import deepspeed

    from dd2dist.teachers import build_family

    if teacher_cfg.official:
        raise ValueError(
            "teacher.official: build_partitioned_teacher takes a dd2dist state dict; convert the official "
            "checkpoint first (dd2dist.teachers.load_official + save) or use zero_stage_teacher=0"
        )
    ensure_distributed()
    state = LazyStateDict(state_path)
    config = frozen_ds_config(zero_stage=3, precision=precision)
    device = worker_device(use_gpu)
    # The dtype comes from the config's bf16 flag, not from Init's dtype argument: DeepSpeed 0.19.8 ignores that
    # argument wherever the accelerator reports no fp16 support (CPUs without oneDNN fp16, e.g. AMD EPYC) and then
    # builds in bf16, which made an "fp32" teacher a bf16 one on such machines
    with deepspeed.zero.Init(config_dict_or_path=config, remote_device=None):
        teacher = build_family(teacher_cfg.family, var=teacher_cfg.var, llamagen=teacher_cfg.llamagen)
    dtype = precision_dtype(precision)
    wrong = sorted({str(p.dtype) for p in teacher.parameters() if p.is_floating_point()} - {str(dtype)})
    if wrong:
        raise RuntimeError(f"the partitioned teacher was built in {wrong}, expected {dtype} "
                           f"(engine.precision={precision!r})")
    teacher.to(device)
    if hasattr(teacher, "init_buffers"):
        teacher.init_buffers(device)
    load_state_module_by_module(teacher, state, source=f"teacher.checkpoint {state_path}")
    return teacher.freeze()


def student_from_teacher_checkpoint(teacher_cfg, student_cfg, state_path: str):
    """The initial student (teacher backbone + a fresh MLP head) without ever materialising the teacher.

    The :class:`~dd2dist.nets.StudentNet` is laid out on the meta device, then allocated on the CPU; its backbone
    tensors are read one at a time from the teacher file (the student keys are the teacher's minus what the
    student drops, under ``backbone.``), its head is freshly initialised (from the current RNG state, so seed every
    rank alike), and its non-persistent buffers are rebuilt. With :func:`build_partitioned_teacher` this is how a
    worker starts without holding the full teacher (``Trainer(student_template=...)``).
    """
    from dd2dist.nets import StudentNet
    from dd2dist.nets.head import MLPHead
    from dd2dist.nets.neighbour_picks import NeighbourPicks
    from dd2dist.nets.student import OUTPUT_LAYER
    from dd2dist.nets.vector_input import VectorInput
    from dd2dist.teachers import build_family

    state = LazyStateDict(state_path)
    with torch.device("meta"):
        student = StudentNet(build_family(teacher_cfg.family, var=teacher_cfg.var, llamagen=teacher_cfg.llamagen),
                             student_cfg, init_adapter=False)
    student = student.to_empty(device="cpu")
    head = student.head
    # the student's own modules, freshly initialised in the order StudentNet builds them (same RNG draws)
    fresh: dict[str, Tensor] = {}
    for name, module in student.named_modules():  # a continuous input path (LlamaGen: under gpt; VAR: top level)
        if isinstance(module, VectorInput):
            fresh.update({f"{name}.{k}": v for k, v in VectorInput(head.token_dim, head.cond_dim).state_dict().items()})
    fresh.update({f"head.{k}": v for k, v in MLPHead(
        token_dim=head.token_dim, cond_dim=head.cond_dim, width=student_cfg.head_width, depth=student_cfg.head_depth,
        time_embed_dim=student_cfg.time_embed_dim).state_dict().items()})
    if student.neighbour_picks is not None:
        picks = student.neighbour_picks
        fresh.update({f"neighbour_picks.{k}": v for k, v in NeighbourPicks(
            picks.vocab_size, head.cond_dim, picks.layout, picks.which).state_dict().items()})
    loaded: dict[str, Tensor] = {}
    names = set(state)
    output_layer = OUTPUT_LAYER[teacher_cfg.family]
    for key in student.state_dict():
        if key in fresh:
            loaded[key] = fresh[key]
        elif key.startswith("code_logits.") and output_layer + key.removeprefix("code_logits") in names:
            # a posterior head's code logits start as the teacher's output layer
            loaded[key] = state[output_layer + key.removeprefix("code_logits")]
        elif key[len("backbone."):] in names:
            loaded[key] = state[key[len("backbone."):]]
        else:
            raise ValueError(f"teacher.checkpoint {state_path} has no {key[len('backbone.'):]!r} for the student")
    student.load_state_dict(loaded)  # strict; its post-hook re-derives the LlamaGen soft-rule tau
    if hasattr(student.backbone, "init_buffers"):
        student.backbone.init_buffers(torch.device("cpu"))
    return student.float()
