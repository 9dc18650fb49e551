"""VAR multi-scale VQVAE: φ mapping, sizes, residual quantisation, f_hat accumulation and decoding."""

import pytest
import torch
import torch.nn.functional as F

from dd2dist.teachers.arch import OFFICIAL_ARCHS, VARVQConfig
from dd2dist.teachers.var_vqvae import VARVQVAE, phi_index_per_scale

TINY_PN = (1, 2, 4)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = VARVQVAE(VARVQConfig(), TINY_PN).eval()
    with torch.no_grad():  # spread the codebook so nearest-code searches are not degenerate
        model.quantize.embedding.weight.normal_()
    return model


def test_phi_mapping_of_the_released_ten_scales_is_hard_coded():
    assert phi_index_per_scale(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    pn = OFFICIAL_ARCHS["var_d16"].patch_nums
    with torch.device("meta"):
        model = VARVQVAE(OFFICIAL_ARCHS["var_d16"].tokenizer, pn)
    assert model.quantize.phi_index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_true_size_parameter_count_and_key_count():
    cfg = OFFICIAL_ARCHS["var_d16"]
    with torch.device("meta"):
        model = VARVQVAE(cfg.tokenizer, cfg.patch_nums)
    assert sum(p.numel() for p in model.parameters()) == 108_948_355
    sd = model.state_dict()
    assert len(sd) == 324
    # skip convs and quantizer shapes straight from docs/teachers.md §2.2
    assert tuple(sd["encoder.down.2.block.0.nin_shortcut.weight"].shape) == (320, 160, 1, 1)
    assert tuple(sd["encoder.down.4.block.0.nin_shortcut.weight"].shape) == (640, 320, 1, 1)
    assert tuple(sd["decoder.up.3.block.0.nin_shortcut.weight"].shape) == (320, 640, 1, 1)
    assert tuple(sd["decoder.up.1.block.0.nin_shortcut.weight"].shape) == (160, 320, 1, 1)
    assert tuple(sd["quantize.embedding.weight"].shape) == (4096, 32)
    assert tuple(sd["quantize.ema_vocab_hit_SV"].shape) == (10, 4096)
    assert tuple(sd["quant_conv.weight"].shape) == (32, 32, 3, 3)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (32, 640, 3, 3)
    assert model.image_size == 256


def test_nearest_ids_of_a_map_built_from_code_vectors_returns_those_ids(vae):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 4, 4), generator=g)
    f = vae.quantize.embedding.weight[ids].permute(0, 3, 1, 2)
    assert torch.equal(vae.quantize.nearest_ids(f), ids)


def _phi_reference(vae, phi_idx, h):
    conv = vae.quantize.quant_resi.qresi_ls[phi_idx]
    return 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)


def test_residual_quantisation_is_greedy_nearest_per_scale(vae):
    """Independent loop: area pooling by block means, brute-force nearest code, φ by explicit conv."""
    g = torch.Generator().manual_seed(2)
    f = torch.randn(3, 8, 4, 4, generator=g)
    with torch.no_grad():
        ids, f_hat = vae.quantize.f_to_ids(f)
        code = vae.quantize.embedding.weight
        rest, acc = f.clone(), torch.zeros_like(f)
        phi_map = [0, 2, 3]  # phi_index_per_scale(3): ticks 1/12..11/12 vs k/2 (the 0.5 tie resolves to 2)
        for k, pn in enumerate(TINY_PN):
            pooled = rest.reshape(3, 8, pn, 4 // pn, pn, 4 // pn).mean(dim=(3, 5))
            flat = pooled.permute(0, 2, 3, 1).reshape(-1, 8)
            want = torch.cdist(flat, code).argmin(1).view(3, pn, pn)
            assert torch.equal(ids[k], want), f"scale {k}"
            h = code[want].permute(0, 3, 1, 2)
            if pn != 4:
                h = F.interpolate(h, size=(4, 4), mode="bicubic", align_corners=False)
            h = _phi_reference(vae, phi_map[k], h)
            acc, rest = acc + h, rest - h
        torch.testing.assert_close(f_hat, acc, rtol=1e-5, atol=1e-5)
        # the accumulated f_hat is what decoding the chosen codes rebuilds
        flat_ids = torch.cat([m.flatten(1) for m in ids], 1)
        torch.testing.assert_close(vae.vectors_to_fhat(vae.split_scales(code[flat_ids])), f_hat, rtol=1e-5, atol=1e-5)


def test_teacher_forced_inputs_match_an_explicit_next_scale_construction(vae):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 8, generator=g)
    with torch.no_grad():
        got = vae.teacher_forced_inputs(x)
        h0 = x[:, 0:1].transpose(1, 2).reshape(2, 8, 1, 1)
        h1 = x[:, 1:5].transpose(1, 2).reshape(2, 8, 2, 2)
        f1 = _phi_reference(vae, 0, F.interpolate(h0, size=(4, 4), mode="bicubic"))
        in1 = f1.reshape(2, 8, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(2, 8, 4).transpose(1, 2)  # area 4x4 -> 2x2
        f2 = f1 + _phi_reference(vae, 2, F.interpolate(h1, size=(4, 4), mode="bicubic"))
        in2 = f2.reshape(2, 8, 16).transpose(1, 2)
    assert got.shape == (2, 20, 8)
    torch.testing.assert_close(got, torch.cat([in1, in2], 1), rtol=1e-5, atol=1e-5)


def test_teacher_forced_inputs_are_differentiable_and_ignore_the_last_scale(vae):
    x = torch.randn(2, 21, 8, requires_grad=True)
    vae.teacher_forced_inputs(x).square().sum().backward()
    assert x.grad[:, :5].abs().sum() > 0
    assert torch.count_nonzero(x.grad[:, 5:]) == 0


def test_sampler_step_rebuilds_the_teacher_forced_inputs(vae):
    x = torch.randn(2, 21, 8)
    with torch.no_grad():
        f_hat, pieces = None, []
        for k, chunk in enumerate(vae.split_scales(x)):
            f_hat, nxt = vae.next_scale_input(k, f_hat, chunk)
            if nxt is not None:
                pieces.append(nxt)
        assert nxt is None
        torch.testing.assert_close(torch.cat(pieces, 1), vae.teacher_forced_inputs(x))
        torch.testing.assert_close(f_hat, vae.vectors_to_fhat(vae.split_scales(x)))


def test_decode_ids_equals_decode_of_code_vectors_and_encode_shapes(vae):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (2, 21), generator=g)
    with torch.no_grad():
        img = vae.decode_ids(ids)
        assert img.shape == (2, 3, 16, 16)
        assert img.abs().max() <= 1
        torch.testing.assert_close(img, vae.decode_vectors(vae.quantize.embedding.weight[ids]))
        enc = vae.img_to_flat_ids(img)
    assert enc.shape == (2, 21) and enc.dtype == torch.long
    assert int(enc.min()) >= 0 and int(enc.max()) < 64


def test_bad_inputs_name_the_problem(vae):
    with pytest.raises(ValueError, match="21 tokens"):
        vae.decode_vectors(torch.zeros(1, 20, 8))
    with pytest.raises(ValueError, match="16x16"):
        vae.img_to_ids(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        VARVQVAE(VARVQConfig(ch=48), TINY_PN)
