"""VQ-16 tokenizer: cosine quantisation, code-vector decoding, official module tree at true size."""

import torch
import torch.nn.functional as F

from dd2dist.teachers.arch import OFFICIAL_ARCHS, VQ16Config
from dd2dist.teachers.vq16 import VQ16


def make(seed: int = 0) -> VQ16:
    torch.manual_seed(seed)
    vq = VQ16(VQ16Config()).eval()
    with torch.no_grad():  # spread the codes out (the released init packs them near zero)
        vq.quantize.embedding.weight.normal_()
    return vq


def test_decode_ids_equals_decode_of_normalised_code_vectors():
    vq = make()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    vectors = F.normalize(vq.quantize.embedding.weight[ids], dim=-1)  # independent of vq.embed
    with torch.no_grad():
        img = vq.decode_ids(ids)
        assert img.shape == (2, 3, 16, 16)
        torch.testing.assert_close(img, vq.decode_vectors(vectors), atol=0, rtol=0)
        # any continuous 8-d map decodes too, and differs from the codes' image
        other = vq.decode_vectors(vectors + 0.3 * torch.randn_like(vectors))
        assert (other - img).abs().max() > 1e-4


def test_quantizing_codebook_vectors_returns_their_ids_at_any_scale():
    vq = make()
    ids = torch.arange(64)
    raw = vq.quantize.embedding.weight.detach()
    assert torch.equal(vq.quantize.nearest_ids(raw), ids)
    assert torch.equal(vq.quantize.nearest_ids(0.01 * raw), ids)  # cosine: the length is irrelevant
    assert torch.allclose(vq.codebook().norm(dim=-1), torch.ones(64))


def test_encode_picks_nearest_normalised_code_of_the_normalised_latent():
    vq = make()
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ids = vq.encode_ids(img)
        z = vq.quant_conv(vq.encoder(img)).permute(0, 2, 3, 1).reshape(2, 16, 8)
    zn, cn = F.normalize(z, dim=-1), F.normalize(vq.quantize.embedding.weight.detach(), dim=-1)
    expect = torch.cdist(zn, cn[None].expand(2, -1, -1)).argmin(-1)  # plain L2 on unit vectors
    assert ids.shape == (2, 16)
    assert torch.equal(ids, expect)


def test_teacher_decode_and_encode_go_through_the_tokenizer():
    from dd2dist.teachers.arch import LlamaGenConfig
    from dd2dist.teachers.llamagen import LlamaGenTeacher

    torch.manual_seed(0)
    t = LlamaGenTeacher(LlamaGenConfig()).freeze()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = t.tokenizer.decode_ids(ids)
        img = t.decode(ids)
        torch.testing.assert_close(img, raw.clamp(-1, 1), atol=0, rtol=0)
        torch.testing.assert_close(t.decode(t.embed(ids)), img, atol=0, rtol=0)
        assert torch.equal(t.encode(img), t.tokenizer.encode_ids(img))
    assert t.encode(img).shape == (2, 16)


def test_true_size_parameter_count_and_module_tree():
    with torch.device("meta"):
        vq = VQ16(OFFICIAL_ARCHS["llamagen_l"].tokenizer)
    assert sum(p.numel() for p in vq.parameters()) == 71_883_403
    sd = vq.state_dict()
    assert len(sd) == 343  # + the ignored quantize.codebook_used = the released 344
    expect_shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_blocks.0.attn.2.v.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "quantize.embedding.weight": (16384, 8),
    }
    for k, shape in expect_shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd
    assert not any(k.startswith("decoder.conv_blocks.1.attn") for k in sd)
